"""Checkpoints: round trip, atomic writes, pruning, clear errors, resume=auto discovery."""
from __future__ import annotations

import io
import os
import tracemalloc
import zipfile

import numpy as np
import pytest

import dtrain.checkpoint as ckpt_mod
from dtrain.checkpoint import (
    CheckpointError,
    CheckpointManager,
    find_latest_run_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dtrain.nn.activation import ReLU
from dtrain.nn.batchnorm import BatchNorm1d
from dtrain.nn.flat import FlatParameters
from dtrain.nn.linear import Linear
from dtrain.nn.module import Sequential, StateDictMismatchError
from dtrain.optim import SGD, Adam

CONFIG = "model:\n  name: tiny\noptim:\n  lr: 0.1\n"


def make_model(seed: int, hidden: int = 5) -> Sequential:
    rng = np.random.default_rng(seed)
    return Sequential(Linear(4, hidden, rng=rng), BatchNorm1d(hidden), ReLU(), Linear(hidden, 3, rng=rng))


def trained(seed: int = 0, steps: int = 3, optimizer: str = "adam"):
    """A model + optimizer after a few real steps, so every state buffer is non-trivial."""
    model = make_model(seed)
    flat = FlatParameters(model)
    opt = Adam(flat, lr=0.01, betas=(0.8, 0.95)) if optimizer == "adam" else SGD(flat, lr=0.1, momentum=0.9)
    rng = np.random.default_rng(seed + 100)
    for _ in range(steps):
        out = model.forward(rng.normal(size=(8, 4)).astype(np.float32))
        model.backward(np.ones_like(out) / out.size)
        opt.step()
    return model, flat, opt


def save(path, model, opt, step=7, **kw):
    args = dict(epoch=2, step=step, rng_state={"seed": 3}, config=CONFIG)
    args.update(kw)
    return save_checkpoint(path, model, opt, **args)


def test_saving_copies_neither_the_weights_nor_the_optimizer_state(tmp_path):
    # 24 MiB of weights, 72 MiB with Adam's two state buffers: the checkpoint write reads
    # them where they are, its only buffer being np.savez's (at most 16 MiB).
    model = Sequential(Linear(2048, 2048), Linear(2048, 1024))
    flat = FlatParameters(model)
    opt = Adam(flat, lr=0.01)
    flat.grads[:] = 1.0
    opt.step()
    tracemalloc.start()
    try:
        save(tmp_path / "c.npz", model, opt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < flat.params.nbytes, f"{peak / 2**20:.1f} MiB allocated to save {flat.params.nbytes / 2**20:.0f} MiB"
    np.testing.assert_array_equal(load_checkpoint(tmp_path / "c.npz").optim_state["state"]["exp_avg"], opt.state["exp_avg"])


def test_round_trip_restores_model_optimizer_and_metadata(tmp_path):
    model, flat, opt = trained(seed=0)
    gen = np.random.default_rng(42)
    gen.normal(size=3)
    rng_state = {"numpy": gen.bit_generator.state, "mt": np.random.MT19937(5).state, "dropout_seed": 9}
    extra = {"history": [{"epoch": 0, "loss": 0.5}], "shape": (1, 28, 28), "mask": np.arange(4),
             "count": np.array(7, dtype=np.int64), "best": np.float32(0.25)}
    path = save(tmp_path / "c.npz", model, opt, step=11, rng_state=rng_state, extra=extra,
                config={"optim": {"lr": 0.1, "betas": [0.9, 0.999]}, "seed": 0})

    # A plain numpy reader sees the documented layout.
    with np.load(path, allow_pickle=False) as raw:
        assert "model/0.weight" in raw.files and "model/1.running_mean" in raw.files
        assert "optim/state/exp_avg" in raw.files
        assert int(raw["meta/step"]) == 11 and int(raw["meta/epoch"]) == 2
        assert str(raw["meta/format"]) == "dtrain-checkpoint-v1"

    ck = load_checkpoint(path)
    assert (ck.step, ck.epoch) == (11, 2)
    assert ck.config == {"optim": {"lr": 0.1, "betas": [0.9, 0.999]}, "seed": 0}
    assert ck.extra["shape"] == (1, 28, 28) and ck.extra["history"] == [{"epoch": 0, "loss": 0.5}]
    np.testing.assert_array_equal(ck.extra["mask"], np.arange(4))
    assert ck.extra["count"].shape == () and ck.extra["count"] == 7 and ck.extra["best"] == 0.25
    assert ck.model_state["1.num_batches_tracked"].shape == () and ck.model_state["1.num_batches_tracked"] == 3
    assert ck.rng_state["dropout_seed"] == 9
    np.testing.assert_array_equal(ck.rng_state["mt"]["state"]["key"], np.random.MT19937(5).state["state"]["key"])
    restored_gen = np.random.default_rng()
    restored_gen.bit_generator.state = ck.rng_state["numpy"]
    assert restored_gen.normal() == gen.normal()

    # Restore into a differently initialized model and a fresh optimizer: everything matches.
    model2 = make_model(seed=99)
    flat2 = FlatParameters(model2)
    opt2 = Adam(flat2, lr=0.5)
    ck.restore(model2, opt2)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(model2.state_dict()[name], value, err_msg=name)
    np.testing.assert_array_equal(flat2.params, flat.params)
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd2["step"] == sd["step"] == 3 and sd2["hyperparameters"] == sd["hyperparameters"]
    for name in sd["state"]:
        np.testing.assert_array_equal(sd2["state"][name], sd["state"][name])
    # ... so both continue on the same trajectory.
    x = np.random.default_rng(5).normal(size=(8, 4)).astype(np.float32)
    for m, o in ((model, opt), (model2, opt2)):
        out = m.forward(x)
        m.backward(out)
        o.step()
    np.testing.assert_array_equal(flat2.params, flat.params)


def test_yaml_text_config_comes_back_as_text(tmp_path):
    model, _, opt = trained(optimizer="sgd")
    ck = load_checkpoint(save(tmp_path / "c.npz", model, opt))
    assert ck.config == CONFIG
    assert ck.optim_state["optimizer"] == "SGD"


def test_model_only_checkpoint_refuses_optimizer_restore(tmp_path):
    model, flat, opt = trained()
    ck = load_checkpoint(save(tmp_path / "c.npz", model, None))
    assert ck.optim_state is None
    ck.restore(make_model(1))
    with pytest.raises(CheckpointError, match="no optimizer state"):
        ck.restore(make_model(1), opt)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, _, opt = trained()
    manager = CheckpointManager(tmp_path, keep_last=2)
    first = manager.save(100, model, opt, epoch=0, rng_state={}, config=CONFIG)
    before = first.read_bytes()

    def crash_after_half(f, arrays):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(ckpt_mod, "_write_npz", crash_after_half)
    with pytest.raises(KeyboardInterrupt):
        manager.save(200, model, opt, epoch=1, rng_state={}, config=CONFIG)
    # Overwriting an existing name must not damage it either.
    with pytest.raises(KeyboardInterrupt):
        manager.save(100, model, opt, epoch=1, rng_state={}, config=CONFIG)

    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000100.npz"]  # no partial file, no temp file
    assert first.read_bytes() == before
    assert manager.latest() == first
    assert load_checkpoint(first).step == 100


def test_stale_temp_file_from_killed_process_is_ignored_and_cleaned(tmp_path):
    model, _, opt = trained()
    CheckpointManager(tmp_path, keep_last=1).save(5, model, opt, epoch=0, rng_state={}, config=CONFIG)
    stale = tmp_path / ".ckpt-00000010.npz.abc123.tmp"
    stale.write_bytes(b"PK\x03\x04 half a zip")
    assert CheckpointManager(tmp_path, keep_last=1).latest() == tmp_path / "ckpt-00000005.npz"
    assert not stale.exists()
    assert find_latest_run_checkpoint([]) is None


def test_keep_last_prunes_oldest_after_the_new_file_is_in_place(tmp_path, monkeypatch):
    model, _, opt = trained(optimizer="sgd")
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    assert manager.latest() is None
    order = []
    real_prune = manager._prune

    def spy_prune(keep):
        order.append(sorted(p.name for p in manager.checkpoints()))
        real_prune(keep)

    monkeypatch.setattr(manager, "_prune", spy_prune)
    for step in (10, 20, 30, 40):
        path = manager.save(step, model, opt, epoch=0, rng_state={}, config=CONFIG)
        assert path.name == f"ckpt-{step:08d}.npz"
    assert [p.name for p in manager.checkpoints()] == ["ckpt-00000030.npz", "ckpt-00000040.npz"]
    assert manager.latest().name == "ckpt-00000040.npz"
    # When pruning ran for step 30, the new file was already there next to the two older ones.
    assert order[2] == ["ckpt-00000010.npz", "ckpt-00000020.npz", "ckpt-00000030.npz"]
    # A save at a lower step (after resuming from an older checkpoint) is never pruned away itself.
    path = manager.save(5, model, opt, epoch=0, rng_state={}, config=CONFIG)
    assert [p.name for p in manager.checkpoints()] == ["ckpt-00000005.npz", "ckpt-00000040.npz"]
    assert manager.load(path).step == 5


@pytest.mark.parametrize("keep_last", [0, -1, 1.5, True])
def test_keep_last_must_be_positive_int(tmp_path, keep_last):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=keep_last)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_byte", "empty"])
def test_corrupt_or_truncated_file_names_the_file(tmp_path, damage):
    model, _, opt = trained()
    path = save(tmp_path / "ckpt-00000007.npz", model, opt)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "garbage":
        data = bytearray(b"not a zip file at all" * 10)
    elif damage == "flip_byte":
        # Flip a byte inside the first weight array's data: the zip CRC check catches it.
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("model/0.weight.npy")
        data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_foreign_npz_and_missing_file(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a dtrain checkpoint") as err:
        load_checkpoint(tmp_path / "other.npz")
    assert "other.npz" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_checkpoint(tmp_path / "nope.npz")


def test_model_mismatch_lists_every_problem_and_names_the_file(tmp_path):
    model, _, opt = trained()
    path = save(tmp_path / "c.npz", model, opt)
    ck = load_checkpoint(path)
    other = Sequential(Linear(4, 6), BatchNorm1d(6), ReLU(), Linear(6, 3), ReLU(), Linear(3, 2))
    before = other.state_dict()
    with pytest.raises(StateDictMismatchError) as err:
        ck.restore(other)
    msg = str(err.value)
    assert str(path) in msg
    assert "'0.weight': (5, 4) given, model (6, 4)" in msg
    assert "missing: ['5.bias', '5.weight']" in msg
    for name, value in other.state_dict().items():  # nothing was copied
        np.testing.assert_array_equal(value, before[name])
    with pytest.raises(StateDictMismatchError, match=r"not in the model: \['3.bias', '3.weight'\]"):
        ck.restore(Sequential(Linear(4, 5), BatchNorm1d(5), ReLU()))


def test_bad_arguments_are_clear(tmp_path):
    model, _, opt = trained()
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        save(tmp_path / "c.npz", model, opt, step=-1)
    with pytest.raises(TypeError, match="OmegaConf"):
        save(tmp_path / "c.npz", model, opt, config=3)
    with pytest.raises(TypeError, match="rng/gen is a Generator"):
        save(tmp_path / "c.npz", model, opt, rng_state={"gen": np.random.default_rng()})
    with pytest.raises(TypeError, match="key 1"):
        save(tmp_path / "c.npz", model, opt, extra={1: "x"})
    assert not list(tmp_path.iterdir())


def test_find_latest_run_checkpoint_picks_newest_across_runs_and_sweeps(tmp_path):
    model, _, opt = trained(optimizer="sgd")
    outputs, multirun = tmp_path / "outputs", tmp_path / "multirun"
    files = {
        "old_long_run": outputs / "2024-01-01" / "10-00-00" / "checkpoints" / "ckpt-00090000.npz",
        "recent_run": outputs / "2024-01-02" / "09-00-00" / "checkpoints" / "ckpt-00000300.npz",
        "recent_run_early": outputs / "2024-01-02" / "09-00-00" / "checkpoints" / "ckpt-00000200.npz",
        "sweep_job": multirun / "2024-01-01" / "12-00-00" / "1" / "checkpoints" / "ckpt-00000050.npz",
        "unrelated": outputs / "2024-01-03" / "checkpoints" / "ckpt-00099999.npz",  # not a run dir layout
    }
    mtimes = {"old_long_run": 1000, "recent_run": 3000, "recent_run_early": 2000, "sweep_job": 2500,
              "unrelated": 9000}
    for key, path in files.items():
        save(path, model, opt)
        os.utime(path, ns=(mtimes[key] * 10**9, mtimes[key] * 10**9))
    assert find_latest_run_checkpoint([outputs, multirun]) == files["recent_run"]
    assert find_latest_run_checkpoint(str(multirun)) == files["sweep_job"]
    assert find_latest_run_checkpoint(outputs, exclude=outputs / "2024-01-02") == files["old_long_run"]
    # Same mtime: the higher step wins.
    os.utime(files["recent_run_early"], ns=(3000 * 10**9, 3000 * 10**9))
    os.utime(files["recent_run"], ns=(3000 * 10**9, 3000 * 10**9))
    assert find_latest_run_checkpoint([outputs, multirun]) == files["recent_run"]
    assert find_latest_run_checkpoint(tmp_path / "missing") is None
    # Relative default roots resolve against the working directory (Hydra keeps cwd: chdir=false).
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert find_latest_run_checkpoint().resolve() == files["recent_run"].resolve()
    finally:
        os.chdir(cwd)


def test_round_trip_from_and_to_device_arrays(tmp_path, xp):
    model = make_model(seed=0).to(xp)
    opt = SGD(FlatParameters(model), lr=0.1, momentum=0.9)
    opt.state["momentum_buffer"][...] = 0.5
    path = save(tmp_path / "c.npz", model, opt, extra={"on_device": xp.arange(3)})
    ck = load_checkpoint(path)
    assert all(isinstance(v, np.ndarray) for v in ck.model_state.values())  # host copies
    np.testing.assert_array_equal(ck.extra["on_device"], np.arange(3))
    model2 = make_model(seed=1).to(xp)
    opt2 = SGD(FlatParameters(model2), lr=0.1, momentum=0.9)
    ck.restore(model2, opt2)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(model2.state_dict()[name], value, err_msg=name)
    np.testing.assert_array_equal(opt2.state_dict()["state"]["momentum_buffer"], 0.5)
