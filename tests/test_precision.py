"""Mixed precision (dtrain.precision): the loss scaler against torch's GradScaler, float16
training against float32, overflow handling, float32 math inside the loss and BatchNorm
for float16 input, and the TF32 switch. CPU only: nothing here imports CuPy."""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch

from dtrain.checkpoint import load_checkpoint, save_checkpoint
from dtrain.config import PrecisionConfig
from dtrain.models import build_model
from dtrain.nn.batchnorm import BatchNorm1d, BatchNorm2d
from dtrain.nn.flat import FlatParameters
from dtrain.nn.loss import SoftmaxCrossEntropy
from dtrain.optim import SGD
from dtrain.precision import (
    FullPrecision,
    LossScaler,
    MixedPrecision,
    enable_tf32,
    make_precision,
)

# A small conv net with both BatchNorm kinds, so the shared running statistics are covered.
SPEC = {
    "name": "tiny_bn",
    "input_shape": [1, 12, 12],
    "init": "kaiming_normal",
    "layers": [
        {"type": "Conv2d", "in_channels": 1, "out_channels": 4, "kernel_size": 3},
        {"type": "BatchNorm2d", "num_features": 4},
        {"type": "ReLU"},
        {"type": "MaxPool2d", "kernel_size": 2},
        {"type": "Flatten"},
        {"type": "Linear", "in_features": 100, "out_features": 16},
        {"type": "BatchNorm1d", "num_features": 16},
        {"type": "ReLU"},
        {"type": "Linear", "in_features": 16, "out_features": 10},
    ],
}


def settings(**overrides) -> PrecisionConfig:
    return PrecisionConfig(**{"compute": "float16", **overrides})


def setup_run(compute: str, **overrides):
    """(precision hooks, master model, master flat, SGD) for SPEC, as dtrain.train builds them."""
    model = build_model(SPEC, seed=3, dtype=np.float32)
    flat = FlatParameters(model)
    mp = make_precision(settings(compute=compute, **overrides), model, flat, SPEC, seed=3)
    return mp, model, flat, SGD(flat, lr=0.1, momentum=0.9)


def train_step(mp, flat, optimizer, x: np.ndarray, y: np.ndarray) -> bool:
    """One step in dtrain.train's order; returns whether the optimizer stepped."""
    loss_fn = SoftmaxCrossEntropy()
    mp.prepare()
    logits = mp.model.forward(mp.cast_input(x))
    loss_fn.forward(logits, y)
    mp.model.backward(loss_fn.backward(mp.loss_scale))
    mp.grads_to_master()
    finite = bool(np.isfinite(flat.grads).all())
    overflow = mp.overflowed(finite)
    if finite:
        optimizer.step()
    else:
        assert overflow, "a non-finite gradient under dynamic scaling must be an overflow"
    return finite


def batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(16, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, 16)) for _ in range(n)]


# -- the loss scaler ----------------------------------------------------------------------
def test_dynamic_scale_sequence_matches_torch_grad_scaler():
    pattern = [True, True, True, True, False, True, True, False, False, True, True, True, True,
               True, True, True, False, True, True, True]
    ours = LossScaler(init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    theirs = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_factor=2.0, backoff_factor=0.5,
                                  growth_interval=3)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    for step, finite in enumerate(pattern):
        theirs.scale(torch.ones(()))  # initializes the scale tensor as a real step would
        p.grad = torch.ones(3) if finite else torch.tensor([1.0, float("inf"), 1.0])
        theirs.step(opt)
        theirs.update()
        ours.update(finite)
        assert ours.scale == theirs.get_scale(), f"step {step}"
        assert ours.growth_tracker == theirs.state_dict()["_growth_tracker"], f"step {step}"
    assert ours.skipped_steps == pattern.count(False)


def test_static_scale_never_changes_and_state_round_trips():
    static = LossScaler(init_scale=128.0, dynamic=False)
    for finite in (False, True, True, False):
        static.update(finite)
    assert static.scale == 128.0 and static.skipped_steps == 0
    dynamic = LossScaler(init_scale=8.0, growth_interval=2)
    for finite in (True, False, True):
        dynamic.update(finite)
    restored = LossScaler()
    restored.load_state_dict(dynamic.state_dict())
    assert restored.state_dict() == {"scale": 4.0, "growth_tracker": 1, "skipped_steps": 1}
    with pytest.raises(ValueError, match="expected keys"):
        restored.load_state_dict({"scale": 4.0})


# -- settings (the keys themselves are checked by the config schema: tests/test_config.py) ---
def test_default_settings_keep_full_precision():
    s = PrecisionConfig()
    assert not s.mixed and not s.tf32
    model = build_model(SPEC, seed=0, dtype=np.float32)
    flat = FlatParameters(model)
    mp = make_precision(s, model, flat, SPEC, seed=0)
    assert type(mp) is FullPrecision and mp.model is model and mp.loss_scale == 1.0
    x = np.ones((2, 1, 12, 12), np.float32)
    assert mp.cast_input(x) is x and mp.state_dict() == {} and not mp.overflowed(False)


# -- mixed-precision training -------------------------------------------------------------
def test_float16_training_tracks_float32_and_keeps_float32_master_weights():
    data = batches(5)
    ref, ref_model, ref_flat, ref_opt = setup_run("float32")
    mp, model, flat, opt = setup_run("float16", init_scale=1024.0)
    assert isinstance(mp, MixedPrecision) and mp.model is not model
    start = flat.params.copy()
    for x, y in data:
        assert train_step(ref, ref_flat, ref_opt, x, y)
        assert train_step(mp, flat, opt, x, y)
    assert flat.params.dtype == np.float32 and flat.grads.dtype == np.float32
    assert mp.twin_flat.params.dtype == np.float16 and mp.twin_flat.grads.dtype == np.float16
    assert np.linalg.norm(ref_flat.params - start) > 0.1  # the steps did change the weights
    rel = np.linalg.norm(flat.params - ref_flat.params) / np.linalg.norm(ref_flat.params)
    assert rel < 1e-2, rel
    # BatchNorm statistics: float32 arrays shared by master and twin, close to the float32 run.
    for (name, mod, key), (_, ref_mod, _) in zip(model.named_buffers(), ref_model.named_buffers()):
        twin_mod = dict(mp.model.named_modules())[name.rsplit(".", 1)[0]]
        assert twin_mod.buffers[key] is mod.buffers[key]
        if key != "num_batches_tracked":
            assert mod.buffers[key].dtype == np.float32
            np.testing.assert_allclose(mod.buffers[key], ref_mod.buffers[key], rtol=2e-2, atol=2e-3)
    assert int(model[1].buffers["num_batches_tracked"]) == len(data)


def test_overflow_skips_the_step_and_halves_the_scale():
    mp, model, flat, opt = setup_run("float16")
    (x, y), = batches(1)
    before = flat.params.copy()
    huge = x * np.float32(1e6)  # beyond float16's 65504: Inf activations, non-finite gradient
    with np.errstate(over="ignore", invalid="ignore"):
        stepped = train_step(mp, flat, opt, huge, y)
    assert not stepped and opt.step_count == 0
    np.testing.assert_array_equal(flat.params, before)
    assert mp.loss_scale == 32768.0 and mp.scaler.skipped_steps == 1 and mp.scaler.growth_tracker == 0
    assert train_step(mp, flat, opt, x, y)  # the next, ordinary batch trains again
    assert not np.array_equal(flat.params, before)


def test_a_static_scale_reports_non_finite_gradients_as_errors():
    mp, _, flat, _ = setup_run("float16", loss_scale=512.0)
    assert mp.loss_scale == 512.0
    assert not mp.overflowed(False) and mp.loss_scale == 512.0  # train.py then applies trainer.on_nonfinite


def test_grads_reach_the_master_unscaled_in_float32():
    mp, _, flat, _ = setup_run("float16", init_scale=4096.0)
    rng = np.random.default_rng(5)
    mp.twin_flat.grads[...] = rng.normal(size=flat.size).astype(np.float16)
    mp.grads_to_master()
    np.testing.assert_array_equal(flat.grads, mp.twin_flat.grads.astype(np.float32) / np.float32(4096.0))
    flat.params[...] = rng.normal(size=flat.size)
    mp.prepare()
    np.testing.assert_array_equal(mp.twin_flat.params, flat.params.astype(np.float16))


def test_a_twin_with_another_layout_is_refused():
    model = build_model(SPEC, seed=0, dtype=np.float32)
    flat = FlatParameters(model)
    other = dict(SPEC, layers=SPEC["layers"][:-1] + [{"type": "Linear", "in_features": 16, "out_features": 9}])
    twin = build_model(other, seed=0).to(np, np.float16)
    with pytest.raises(ValueError, match="layout differs from the master's"):
        MixedPrecision(model, flat, twin, FlatParameters(twin), LossScaler())


def test_loss_scaler_state_travels_in_a_checkpoint(tmp_path):
    mp, model, _, opt = setup_run("float16", growth_interval=3)
    for finite in (False, True, True):
        mp.overflowed(finite)
    path = save_checkpoint(tmp_path / "c.npz", model, opt, epoch=0, step=3, rng_state={}, config="",
                           extra=mp.state_dict())
    fresh, *_ = setup_run("float16", growth_interval=3)
    fresh.load_state_dict(load_checkpoint(path).extra)
    assert fresh.scaler.state_dict() == {"scale": 32768.0, "growth_tracker": 2, "skipped_steps": 1}


# -- float32 math inside the loss and BatchNorm ---------------------------------------------
def test_loss_on_float16_logits_works_in_float32():
    rng = np.random.default_rng(0)
    logits = (1e4 + 30 * rng.normal(size=(8, 5))).astype(np.float16)
    labels = rng.integers(0, 5, 8)
    ours = SoftmaxCrossEntropy()
    loss = ours.forward(logits, labels)
    grad = ours.backward(scale=1024.0)
    ref = SoftmaxCrossEntropy()
    ref_loss = ref.forward(logits.astype(np.float32), labels)
    ref_grad = ref.backward(scale=1024.0)
    assert loss.dtype == np.float32 and grad.dtype == np.float16
    assert float(loss) == float(ref_loss)  # the same float32 computation
    np.testing.assert_allclose(grad.astype(np.float32), ref_grad, rtol=1e-3, atol=1e-3)
    # A loss beyond float16's range (65504): shifted logits of -1.2e5 are -inf in float16.
    wide = np.array([[6e4, -6e4], [0.0, 1.0]], dtype=np.float16)
    loss = SoftmaxCrossEntropy().forward(wide, np.array([1, 1]))
    assert np.isfinite(loss) and float(loss) == pytest.approx((1.2e5 + np.log1p(np.exp(-1.0))) / 2, rel=1e-6)


@pytest.mark.parametrize("layer_cls, shape", [(BatchNorm2d, (6, 3, 4, 5)), (BatchNorm1d, (40, 3))])
@pytest.mark.parametrize("stats", [np.float32, np.float16])
def test_batchnorm_on_float16_input_works_in_float32(layer_cls, shape, stats):
    rng = np.random.default_rng(1)
    # A mean of 300: sums of squares (~1e7) overflow float16, the variance cancels catastrophically.
    x = (300 + 2 * rng.normal(size=shape)).astype(np.float16)
    g = rng.normal(size=shape).astype(np.float16)
    ref = layer_cls(3, dtype=np.float32)
    ref.params["weight"][...] = [0.5, 1.0, 2.0]
    ref.params["bias"][...] = [0.1, -0.2, 0.3]
    half = layer_cls(3, dtype=np.float32).to(np, np.float16)
    half.load_state_dict(ref.state_dict())
    for key in half.buffers:
        half.buffers[key] = half.buffers[key].astype(stats if key != "num_batches_tracked" else np.int64)
    for training in (True, False):
        ref.train(training), half.train(training)
        y = half.forward(x)
        y_ref = ref.forward(x.astype(np.float32))
        dx = half.backward(g.copy())
        dx_ref = ref.backward(g.astype(np.float32))
        assert y.dtype == dx.dtype == np.float16 and np.isfinite(y).all() and np.isfinite(dx).all()
        np.testing.assert_allclose(y.astype(np.float32), y_ref, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(dx.astype(np.float32), dx_ref, rtol=5e-3, atol=5e-3 * np.abs(dx_ref).max())
        for key in ("weight", "bias"):
            np.testing.assert_allclose(half.grads[key].astype(np.float32), ref.grads[key], rtol=2e-3, atol=1e-2)
        if training and stats == np.float32:  # the same float32 update as the float32 layer
            for key in ("running_mean", "running_var"):
                np.testing.assert_array_equal(half.buffers[key], ref.buffers[key])


def test_batchnorm_still_refuses_mismatched_dtypes():
    with pytest.raises(TypeError, match="float16 input but its parameters are float32"):
        BatchNorm1d(3).forward(np.ones((2, 3), dtype=np.float16))
    layer = BatchNorm1d(3, affine=False, dtype=np.float64)
    with pytest.raises(TypeError, match="running statistics are float64"):
        layer.forward(np.ones((2, 3), dtype=np.float16))


# -- TF32 -----------------------------------------------------------------------------------
def test_enable_tf32_sets_the_env_variable_and_the_cupy_compute_type(monkeypatch):
    calls = []
    linalg = types.ModuleType("cupy._core._routines_linalg")
    linalg.COMPUTE_TYPE_TF32 = 7
    linalg.set_compute_type = lambda dtype, kind: calls.append((np.dtype(dtype), kind))
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    fake = types.ModuleType("cupy")
    fake._core = core
    for name, module in (("cupy", fake), ("cupy._core", core), ("cupy._core._routines_linalg", linalg)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("CUPY_TF32", "0")  # restored after the test
    enable_tf32()
    assert os.environ["CUPY_TF32"] == "1"
    assert calls == [(np.dtype(np.float32), 7)]
