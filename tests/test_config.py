"""The config schema: every shipped config passes, every bad value fails at start-up with
one line naming the key, the value and what is allowed, before any data is read."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir

from dtrain.config import ConfigError, RunConfig, config_dir, load_model_spec, validate


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("group, option", [(p.parent.name, p.stem) for p in sorted(config_dir().glob("*/*.yaml"))])
def test_every_shipped_config_passes(group, option):
    cfg = validate(composed(f"{group}={option}"))
    assert isinstance(cfg, RunConfig)


def test_defaults_are_typed():
    cfg = validate(composed())
    assert cfg.model.name == "alexnet" and cfg.optim.name == "adam" and cfg.optim.lr == 1e-4
    assert cfg.trainer.batch_size == 64 and cfg.parallel.overlap == "auto" and cfg.threads is None
    assert cfg.model.input_shape == (1, 28, 28) and load_model_spec("lenet")["name"] == "lenet"


@pytest.mark.parametrize("overrides, message", [
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size=0: Input should be greater than or equal to 1"),
    (["trainer.batch_size=abc"], "trainer.batch_size='abc': Input should be a valid integer"),
    (["trainer.epochs=abc"], "trainer.epochs='abc': Input should be a valid integer"),
    (["seed=abc"], "seed='abc': Input should be a valid integer"),
    (["trainer.epochs=-1"], "trainer.epochs=-1: Input should be greater than or equal to 1"),
    (["trainer.max_steps=0"], "trainer.max_steps=0: Input should be greater than or equal to 1"),
    (["data.augment=maybe"], "data.augment='maybe': Input should be a valid boolean"),
    (["+trainer.epoch=3"], "unknown config key trainer.epoch=3; trainer has mode, epochs,"),
    (["+optim.momentum=0.9"], "unknown config key optim.momentum=0.9; optim has lr, weight_decay, schedule, name, betas"),
    (["parallel.overlap=sometimes"], "parallel.overlap='sometimes': Input should be a valid boolean or Input should be 'auto'"),
    (["trainer.mode=evaluate"], "trainer.mode='evaluate': Input should be 'train', 'eval', 'predict' or 'export'"),
    (["model.input_shape=[1,28]"], "model.input_shape=[1, 28]: item 2: Field required"),
    (["precision.compute=bfloat16"], "neither NumPy nor CuPy has a bfloat16 array type; use precision.compute=float16"),
    (["precision.compute=half"], "precision.compute='half': Input should be 'float32' or 'float16'"),
    (["precision.compute=float16", "dtype=float64"], "dtype='float64': precision.compute=float16 keeps float32 master"),
    (["precision.tf32=true", "device=cpu"], "precision.tf32=True: TF32 is a GPU tensor-core mode"),
    (["precision.loss_scale=auto"], "precision.loss_scale='auto': Input should be 'dynamic' or Input should be a valid number"),
    (["precision.backoff_factor=1.5"], "precision.backoff_factor=1.5: Input should be less than 1"),
    (["precision.growth_factor=1.0"], "precision.growth_factor=1.0: Input should be greater than 1"),
    (["parallel.deterministic=true", "trainer.batch_size=50"], "trainer.batch_size=50: deterministic mode cuts it"),
    (["parallel.deterministic=true", "parallel.sync_batchnorm=true", "trainer.batch_size=48"],
     "parallel.sync_batchnorm=True: deterministic"),
    (["data=mnist", "+data.num_classes=3"], "image_shape and num_classes apply to data=synthetic only"),
    (["optim=sgd", "optim.lr=0.1", "optim.schedule.min_lr=0.5"], "optim.schedule.min_lr=0.5: at most optim.lr=0.1"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(composed(*overrides))
    text = str(err.value)
    assert message in text and "\n" not in text, text


# The list, end to end: one line on stderr, exit status 1, the traceback in the log.
START_UP = ["trainer.eval_batch_size=0", "trainer.batch_size=abc", "trainer.epochs=abc", "seed=abc",
            "trainer.epochs=-1", "trainer.max_steps=0", "data.augment=maybe", "+trainer.epoch=3"]


@pytest.mark.parametrize("override", START_UP)
def test_bad_values_fail_at_start_up_in_one_line(tmp_path, override):
    # Kaggle data under a root that does not exist: reading any data would fail otherwise.
    args = [sys.executable, "-m", "dtrain", "model=lenet", "data=kaggle_digits", f"data.root={tmp_path / 'none'}",
            "device=cpu", override]
    start = time.monotonic()
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    key = override.lstrip("+").split("=")[0]
    assert len(lines) == 1 and lines[0].startswith("dtrain: error: ") and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "kaggle" not in lines[0].lower()
    (run,) = [p.parent for p in tmp_path.glob("outputs/*/*/.hydra")]
    assert "Traceback" in (run / "dtrain.log").read_text() and str(run / "dtrain.log") in lines[0]
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    assert not (run / "checkpoints").exists() and not (run / "tensorboard").exists()
    print(f"{override}: failed after {elapsed:.2f} s")  # start-up time, reported with -s, not judged
