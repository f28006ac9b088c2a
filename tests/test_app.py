"""``python -m dtrain`` end to end: Hydra overrides, sweeps, outputs, resume, eval, predict."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
# Small and fast: lenet on a 512-image subset of the built-in MNIST sample.
FAST = ["model=lenet", "data=mnist_sample", "data.train_size=512", "data.test_size=256",
        "trainer.batch_size=64", "trainer.progress=false", "logging.hist_interval=4",
        "logging.log_interval=1", "device=cpu", "threads=1"]


def dtrain(cwd: Path, *overrides: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "dtrain", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dtrain failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("outputs/*/*/.hydra"))


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = dtrain(tmp_path, "--cfg", "job", "optim.lr=0.123").stdout
    assert "name: alexnet" in out and "lr: 0.123" in out and "batch_size: 64" in out


def test_unknown_key_fails_with_hydra_error(tmp_path):
    proc = dtrain(tmp_path, "trainer.epoch=3", check=False)
    assert proc.returncode != 0
    assert "Could not override 'trainer.epoch'" in proc.stderr


def test_a_bad_overlap_value_is_named(tmp_path):
    proc = dtrain(tmp_path, *FAST, "trainer.max_steps=1", "parallel.overlap=sometimes", check=False)
    assert proc.returncode != 0
    assert "parallel.overlap='sometimes': Input should be a valid boolean or Input should be 'auto'" in proc.stderr


def test_train_writes_summary_checkpoint_and_tensorboard(tmp_path):
    dtrain(tmp_path, *FAST, "trainer.epochs=3", "optim.lr=0.05")
    (run,) = run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "lenet" and summary["steps"] == 24 and summary["epochs"] == 3
    assert 0.3 < summary["test_accuracy"] <= 1.0  # well above chance after 24 steps
    assert summary["images_per_sec"] > 0
    assert len(summary["history"]) == 3
    ckpt = np.load(sorted((run / "checkpoints").glob("ckpt-*.npz"))[-1])
    assert ckpt["model/0.weight"].shape == (6, 1, 5, 5)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def test_multirun_sweep_runs_each_value(tmp_path):
    dtrain(tmp_path, "--multirun", *FAST, "trainer.max_steps=2", "optim.lr=0.01,0.05")
    summaries = sorted(tmp_path.glob("multirun/*/*/*/summary.json"))
    assert len(summaries) == 2
    cfgs = [(p.parent / ".hydra" / "overrides.yaml").read_text() for p in summaries]
    assert any("optim.lr=0.01" in c for c in cfgs) and any("optim.lr=0.05" in c for c in cfgs)


@pytest.mark.blas
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    assert_resume_matches_uninterrupted(tmp_path)


def assert_resume_matches_uninterrupted(tmp_path: Path, *extra: str) -> None:
    # 6 steps straight vs 3 steps + resume for 3 more (mid-epoch: 8 steps per epoch), with
    # dropout-free lenet and a constant LR so the stop point changes nothing but the split.
    common = [*FAST, "optim.schedule.kind=constant", "trainer.epochs=2", "trainer.checkpoint_every=3", *extra]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    dtrain(a, *common, "trainer.max_steps=6")
    dtrain(b, *common, "trainer.max_steps=3")
    dtrain(b, *common, "trainer.max_steps=6", "trainer.resume=auto")
    final_a = np.load(sorted(run_dirs(a)[0].glob("checkpoints/ckpt-*.npz"))[-1])
    final_b = np.load(sorted(run_dirs(b)[-1].glob("checkpoints/ckpt-*.npz"))[-1])
    assert int(final_a["meta/step"]) == int(final_b["meta/step"]) == 6
    model_keys = [k for k in final_a.files if k.startswith(("model/", "optim/"))]
    assert model_keys
    for key in model_keys:
        np.testing.assert_array_equal(final_a[key], final_b[key], err_msg=key)
    assert str(final_a["meta/extra"]) == str(final_b["meta/extra"])  # e.g. the loss scaler's state


# Mixed precision: a start scale of 2**40 overflows float16 and backs off by 2**-12 twice
# to 65536, which fits lenet's gradients: exactly two skipped steps, then training.
FLOAT16 = ["precision.compute=float16", "precision.init_scale=1099511627776.0",
           "precision.backoff_factor=0.000244140625"]


def test_float16_training_learns_and_records_precision(tmp_path):
    proc = dtrain(tmp_path, *FAST, *FLOAT16, "trainer.epochs=2", "optim.lr=0.05")
    (run,) = run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == {"compute": "float16", "master": "float32", "loss_scale": "dynamic",
                                    "final_loss_scale": 65536.0, "skipped_steps": 2, "tf32": False}
    assert summary["steps"] == 16 and summary["test_accuracy"] > 0.2  # chance is 0.1
    assert summary["history"][1]["train_loss"] < summary["history"][0]["train_loss"]
    ckpt = np.load(sorted(run.glob("checkpoints/ckpt-*.npz"))[-1])
    assert ckpt["model/0.weight"].dtype == np.float32  # master weights
    assert "precision float16 compute, float32 master weights" in proc.stdout + proc.stderr


@pytest.mark.blas
def test_interrupted_and_resumed_float16_run_matches_uninterrupted(tmp_path):
    # growth_interval=2: the scale grows (and the tracker counts) across the resume point.
    assert_resume_matches_uninterrupted(tmp_path, "precision.compute=float16", "precision.growth_interval=2")


@pytest.mark.parametrize("override, message", [
    ("precision.compute=bfloat16", "neither NumPy nor CuPy has a bfloat16 array type; use precision.compute=float16"),
    ("precision.tf32=true", "precision.tf32=True: TF32 is a GPU tensor-core mode: use device=gpu or auto"),
    ("precision.fp16=true", "Could not override 'precision.fp16'"),
])
def test_bad_precision_settings_fail_clearly(tmp_path, override, message):
    proc = dtrain(tmp_path, *FAST, "trainer.max_steps=1", override, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


def test_eval_and_predict_modes_use_a_checkpoint(tmp_path):
    dtrain(tmp_path, *FAST, "trainer.max_steps=8")
    (run,) = run_dirs(tmp_path)
    ckpt = sorted(run.glob("checkpoints/ckpt-*.npz"))[-1]
    dtrain(tmp_path, *FAST, "trainer.mode=eval", f"trainer.checkpoint={ckpt}")
    dtrain(tmp_path, *FAST, "trainer.mode=predict", f"trainer.checkpoint={ckpt}")
    runs = run_dirs(tmp_path)
    metrics = json.loads(next(r / "eval.json" for r in runs if (r / "eval.json").exists()).read_text())
    assert metrics["samples"] == 256 and 0.0 <= metrics["accuracy"] <= 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert metrics["accuracy"] == pytest.approx(summary["test_accuracy"])
    pred_file = next(r / "predictions.csv" for r in runs if (r / "predictions.csv").exists())
    rows = list(csv.reader(pred_file.open()))
    assert rows[0] == ["ImageId", "Label"] and len(rows) == 257
    assert rows[1][0] == "1" and all(0 <= int(r[1]) <= 9 for r in rows[1:])


def test_offline_mnist_falls_back_to_sample_with_one_clear_line(tmp_path):
    proc = dtrain(tmp_path, *[o for o in FAST if not o.startswith("data=")], "data=mnist",
                  f"data.root={tmp_path / 'nodata'}", "data.mirrors=[http://127.0.0.1:9/]",
                  "trainer.max_steps=1")
    out = proc.stdout + proc.stderr
    lines = [l for l in out.splitlines() if "instead" in l]
    assert len(lines) == 1 and "mnist_sample" in lines[0], proc.stderr
    assert "127.0.0.1:9" not in lines[0]  # the per-mirror details stay out of the one line


def test_offline_mnist_fails_when_fallback_disabled(tmp_path):
    proc = dtrain(tmp_path, *[o for o in FAST if not o.startswith("data=")], "data=mnist",
                  f"data.root={tmp_path / 'nodata'}", "data.mirrors=[http://127.0.0.1:9/]",
                  "data.fallback=null", "trainer.max_steps=1", check=False)
    assert proc.returncode != 0
    assert "mnist" in proc.stderr and "127.0.0.1:9" in proc.stderr


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    proc = dtrain(tmp_path, *FAST, "optim.lr=1e12", "optim.schedule.kind=constant",
                  "trainer.checkpoint_every=1", "trainer.epochs=3", check=False)
    assert proc.returncode != 0
    assert "non-finite" in proc.stderr
    (run,) = run_dirs(tmp_path)
    ckpts = sorted(run.glob("checkpoints/ckpt-*.npz"))
    assert ckpts and np.isfinite(np.load(ckpts[-1])["model/0.weight"]).all()


def test_a_users_config_dir_adds_a_model(tmp_path):
    conf = tmp_path / "my_conf" / "model"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(
        "name: mine\ninput_shape: [1, 28, 28]\nlayers:\n"
        "  - {type: Conv2d, in_channels: 1, out_channels: 4, kernel_size: 3, stride: 2}\n"
        "  - {type: ReLU}\n  - {type: Flatten}\n  - {type: Linear, in_features: 676, out_features: 10}\n")
    dtrain(tmp_path, "--config-dir", str(tmp_path / "my_conf"), *[o for o in FAST if not o.startswith("model=")],
           "model=mine", "trainer.max_steps=2")
    (run,) = run_dirs(tmp_path)
    assert json.loads((run / "summary.json").read_text())["model"] == "mine"


# -- trainer.resume=auto and trainer.checkpoint=auto --------------------------------------
SYNTH = ["data=synthetic", "data.train_size=256", "data.test_size=64", "trainer.batch_size=32",
         "trainer.progress=false", "logging.tensorboard=false", "device=cpu", "threads=1"]


def test_auto_resume_in_a_sweep_never_takes_a_sibling_job(tmp_path):
    proc = dtrain(tmp_path, "--multirun", "model=lenet", "optim.lr=0.01,0.05", "trainer.resume=auto", *SYNTH,
                  "trainer.max_steps=5")
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("multirun/*/*/*/summary.json"))]
    assert [s["steps"] for s in summaries] == [5, 5]
    assert all(s["test_accuracy"] is not None for s in summaries)
    assert proc.stderr.count("starting fresh") + proc.stdout.count("starting fresh") == 2


def test_auto_resume_takes_the_newest_run_with_the_same_model_and_data(tmp_path):
    dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.max_steps=2", "hydra.run.dir=outputs/d/lenet")
    dtrain(tmp_path, "model=simple_cnn", *SYNTH, "trainer.max_steps=2", "hydra.run.dir=outputs/d/simple_cnn")
    dtrain(tmp_path, "model=lenet", *SYNTH, "data.train_size=128", "trainer.max_steps=2",
           "hydra.run.dir=outputs/d/lenet_other_data")
    proc = dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.max_steps=4", "trainer.resume=auto",
                  "hydra.run.dir=outputs/d/resumed")
    out = proc.stdout + proc.stderr
    assert "resumed from outputs/d/lenet/checkpoints/ckpt-00000002.npz" in out, out
    assert "an earlier run with this model and data" in out
    assert json.loads((tmp_path / "outputs/d/resumed/summary.json").read_text())["steps"] == 4
    # eval and predict choose the same way
    proc = dtrain(tmp_path, "model=simple_cnn", *SYNTH, "trainer.mode=eval", "trainer.checkpoint=auto",
                  "hydra.run.dir=outputs/d/eval")
    assert "loaded outputs/d/simple_cnn/checkpoints/ckpt-00000002.npz" in proc.stdout + proc.stderr
    proc = dtrain(tmp_path, "model=simple_cnn", *SYNTH, "data.num_classes=5", "trainer.mode=eval",
                  "trainer.checkpoint=auto", "hydra.run.dir=outputs/d/eval5", check=False)
    assert proc.returncode == 1 and "no checkpoint to eval with: no earlier run has this model and data" in proc.stderr


def test_auto_resume_continues_its_own_run_directory(tmp_path):
    common = ["model=lenet", *SYNTH, "hydra.run.dir=outputs/d/run", "trainer.checkpoint_every=2"]
    dtrain(tmp_path, *common, "trainer.max_steps=4")
    dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.max_steps=2", "hydra.run.dir=outputs/d/newer")
    proc = dtrain(tmp_path, *common, "trainer.max_steps=6", "trainer.resume=auto")
    out = proc.stdout + proc.stderr
    assert "outputs/d/run/checkpoints/ckpt-00000004.npz (this run directory's newest checkpoint)" in out, out


def test_a_resumed_run_removes_the_interrupted_saves_of_the_run_it_resumes(tmp_path):
    dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.max_steps=2", "hydra.run.dir=outputs/d/killed")
    stale = tmp_path / "outputs/d/killed/checkpoints/.ckpt-00000004.npz.x1y2.tmp"  # a save cut short by SIGKILL
    stale.write_bytes(b"\0" * 1000)
    proc = dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.max_steps=4",
                  "trainer.resume=outputs/d/killed/checkpoints/ckpt-00000002.npz", "hydra.run.dir=outputs/d/next")
    assert not stale.exists()
    assert "removed 1 temporary file(s) of interrupted saves there" in proc.stdout + proc.stderr


def test_resuming_with_another_seed_or_batch_is_refused(tmp_path):
    dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.max_steps=2", "hydra.run.dir=outputs/d/a")
    ckpt = "outputs/d/a/checkpoints/ckpt-00000002.npz"
    for override, key in (("seed=1", "seed"), ("trainer.batch_size=64", "trainer.batch_size")):
        proc = dtrain(tmp_path, "model=lenet", *SYNTH, override, "trainer.max_steps=4", f"trainer.resume={ckpt}",
                      check=False)
        assert proc.returncode == 1
        assert f"was trained with {key}=" in proc.stderr and "would not continue its data order" in proc.stderr


def test_a_non_finite_step_after_a_resume_names_the_resumed_checkpoint(tmp_path):
    dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.max_steps=2", "hydra.run.dir=outputs/d/a")
    ckpt = "outputs/d/a/checkpoints/ckpt-00000002.npz"
    proc = dtrain(tmp_path, "model=lenet", *SYNTH, "optim.lr=1e12", "optim.schedule.kind=constant",
                  "trainer.max_steps=20", f"trainer.resume={ckpt}", check=False)
    assert proc.returncode == 1
    assert f"the last good checkpoint is {ckpt}" in proc.stderr, proc.stderr


def test_a_full_disk_ends_the_run_in_one_line_and_keeps_the_earlier_checkpoints(tmp_path):
    # The disk fills up at the second checkpoint write (numpy.savez raises ENOSPC there).
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import errno, numpy\n"
        "_savez, _calls = numpy.savez, []\n"
        "def savez(file, *args, **kwargs):\n"
        "    _calls.append(1)\n"
        "    if len(_calls) >= 2:\n"
        "        file.write(b'partial')\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return _savez(file, *args, **kwargs)\n"
        "numpy.savez = savez\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)]), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "dtrain", "model=lenet", *SYNTH, "trainer.max_steps=6",
                           "trainer.checkpoint_every=2", "hydra.run.dir=outputs/d/full"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    run = tmp_path / "outputs/d/full"
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"dtrain: error: cannot write checkpoint {run}/checkpoints/ckpt-00000004.npz: no space "
                               f"left on device; last good checkpoint: {run}/checkpoints/ckpt-00000002.npz"), lines[0]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt-00000002.npz"]  # no temp file left either
    np.load(run / "checkpoints" / "ckpt-00000002.npz")["model/0.weight"]


def test_export_writes_a_model_that_pytorch_alone_runs_like_dtrain(tmp_path):
    torch = pytest.importorskip("torch")
    dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.max_steps=3", "hydra.run.dir=outputs/d/train")
    dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.mode=predict", "trainer.checkpoint=auto",
           "hydra.run.dir=outputs/d/predict")
    dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.mode=export", "trainer.checkpoint=auto",
           "hydra.run.dir=outputs/d/export")
    card = json.loads((tmp_path / "outputs/d/export/export/model.json").read_text())
    assert card["checkpoint"].endswith("outputs/d/train/checkpoints/ckpt-00000003.npz")
    assert card["model"]["name"] == "lenet" and card["classes"] == 10 and card["input_shape"] == [1, 28, 28]
    from dtrain.data import load_dataset

    test = load_dataset("synthetic", "test", size=64)
    assert (card["mean"], card["std"]) == pytest.approx((test.mean, test.std))
    # README's snippet, as printed there, in the run directory
    snippet = (REPO / "README.md").read_text().split("<!-- export-snippet -->\n```python\n", 1)[1].split("```", 1)[0]
    scope = {"images": test.images}
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "outputs/d/export")
        exec(snippet, scope)
    finally:
        os.chdir(cwd)
    rows = list(csv.reader((tmp_path / "outputs/d/predict/predictions.csv").open()))[1:]
    assert scope["predictions"].tolist() == [int(label) for _, label in rows]
    assert isinstance(scope["model"], torch.nn.Module)


def test_safetensors_export_needs_no_pytorch_to_read(tmp_path):
    dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.max_steps=2", "hydra.run.dir=outputs/d/train")
    dtrain(tmp_path, "model=lenet", *SYNTH, "trainer.mode=export", "trainer.export_format=safetensors",
           "trainer.checkpoint=outputs/d/train/checkpoints/ckpt-00000002.npz", "hydra.run.dir=outputs/d/export")
    from safetensors.numpy import load_file

    weights = load_file(str(tmp_path / "outputs/d/export/export/model.safetensors"))
    ckpt = np.load(tmp_path / "outputs/d/train/checkpoints/ckpt-00000002.npz")
    np.testing.assert_array_equal(weights["0.weight"], ckpt["model/0.weight"])


def kaggle_root(tmp_path: Path) -> Path:
    """Kaggle-style train.csv (200 labeled) and test.csv (30 unlabeled) digits."""
    from data_files import mnist_arrays, pixel_csv

    root = tmp_path / "kaggle"
    root.mkdir()
    images, labels = mnist_arrays(200, seed=1)
    (root / "train.csv").write_text(pixel_csv(images, labels, header=True))
    (root / "test.csv").write_text(pixel_csv(mnist_arrays(30, seed=2)[0], None, header=True))
    return root


KAGGLE = ["model=lenet", "data=kaggle_digits", "trainer.batch_size=30", "trainer.progress=false",
          "logging.tensorboard=false", "device=cpu", "threads=1", "trainer.epochs=1"]


def test_kaggle_evaluates_on_held_out_training_samples_and_predicts_the_test_csv(tmp_path):
    root = kaggle_root(tmp_path)
    proc = dtrain(tmp_path, *KAGGLE, f"data.root={root}", "hydra.run.dir=outputs/d/k")
    out = proc.stdout + proc.stderr
    assert "the test split has no labels; evaluating on 20 training samples held out (data.holdout=0.1)" in out
    assert "nan" not in out
    summary = json.loads((tmp_path / "outputs/d/k/summary.json").read_text())
    assert summary["history"][0]["test_samples"] == 20 and summary["steps"] == 6  # 180 / 30
    dtrain(tmp_path, *KAGGLE, f"data.root={root}", "trainer.mode=predict", "trainer.checkpoint=auto",
           "hydra.run.dir=outputs/d/p")
    rows = list(csv.reader((tmp_path / "outputs/d/p/predictions.csv").open()))
    assert len(rows) == 31  # header + every test.csv image
    proc = dtrain(tmp_path, *KAGGLE, f"data.root={root}", "data.holdout=0", "hydra.run.dir=outputs/d/none")
    out = proc.stdout + proc.stderr
    assert "no evaluation during training (data.holdout=0)" in out and "no labeled test data" in out


@pytest.mark.parametrize("overrides, message", [
    (["model=lenet", "model.input_shape=[3,32,32]", "model.layers.0.in_channels=3", "model.layers.7.in_features=400"],
     "data 'synthetic' has images of shape (1, 28, 28) but model 'lenet' takes input_shape (3, 32, 32)"),
    (["model=lenet", "model.layers.11.out_features=5"],
     "data 'synthetic' has 10 classes but model 'lenet' has 5 outputs: its last layer needs out_features=10"),
])
def test_data_that_does_not_fit_the_model_fails_at_start_up(tmp_path, overrides, message):
    proc = dtrain(tmp_path, *overrides, *[o for o in SYNTH if not o.startswith("model=")], check=False)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_run_shorter_than_the_histogram_interval_still_writes_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dtrain(tmp_path, "model=lenet", *[o for o in SYNTH if o != "logging.tensorboard=false"], "trainer.max_steps=3",
           "logging.hist_interval=200", "hydra.run.dir=outputs/d/h")
    events = EventAccumulator(str(tmp_path / "outputs/d/h/tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    assert "weights/0.weight" in events.Tags()["histograms"]
    assert [e.step for e in events.Histograms("weights/0.weight")] == [3]
