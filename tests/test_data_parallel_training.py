"""Data-parallel training through ``mpirun -n N python -m dtrain``: same answer at any scale,
one shared run directory, and no hangs when a rank fails."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mpirun_helper import launch, run_dtrain

# A model with dropout: its randomness must not depend on how the global batch is split.
TINY = """
model:
  name: tiny
  input_shape: [1, 28, 28]
  init: kaiming_normal
  layers:
    - {type: Conv2d, in_channels: 1, out_channels: 4, kernel_size: 5, stride: 2}
    - {type: ReLU}
    - {type: MaxPool2d, kernel_size: 2}
    - {type: Flatten}
    - {type: Linear, in_features: 144, out_features: 32}
    - {type: ReLU}
    - {type: Dropout, p: 0.5}
    - {type: Linear, in_features: 32, out_features: 10}
"""
COMMON = ["data=mnist_sample", "data.train_size=480", "data.test_size=150", "trainer.batch_size=48",
          "trainer.progress=false", "device=cpu", "logging.tensorboard=false", "parallel.check_interval=2"]


# Batch norm and dropout, whose statistics and masks must not depend on the split, and
# GEMMs large enough that OpenBLAS runs them on two threads when it may (for 8-sample
# micro-batches: conv1 (32, 25, 6272), conv2 (64, 800, 1568)), which on some kernel
# families (Haswell's, here) rounds differently from one thread.
DET_NET = """
model:
  name: det_net
  input_shape: [1, 28, 28]
  init: kaiming_normal
  layers:
    - {type: Conv2d, in_channels: 1, out_channels: 32, kernel_size: 5, padding: 2}
    - {type: BatchNorm2d, num_features: 32}
    - {type: ReLU}
    - {type: MaxPool2d, kernel_size: 2}
    - {type: Conv2d, in_channels: 32, out_channels: 64, kernel_size: 5, padding: 2}
    - {type: ReLU}
    - {type: MaxPool2d, kernel_size: 2}
    - {type: Flatten}
    - {type: Linear, in_features: 3136, out_features: 128}
    - {type: ReLU}
    - {type: Dropout, p: 0.5}
    - {type: Linear, in_features: 128, out_features: 10}
"""


def extra_models(tmp_path: Path) -> str:
    conf = tmp_path / "extra_conf" / "model"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "tiny.yaml").write_text("# @package _global_\n" + TINY)
    (conf / "det_net.yaml").write_text("# @package _global_\n" + DET_NET)
    return f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]"


@pytest.fixture
def tiny_model(tmp_path) -> list[str]:
    return [extra_models(tmp_path), "model=tiny"]


@pytest.fixture
def det_model(tmp_path) -> list[str]:
    return [extra_models(tmp_path), "model=det_net"]


def final_params(run: Path) -> dict[str, np.ndarray]:
    """The last checkpoint's parameters and buffers (BatchNorm running statistics)."""
    ckpt = np.load(sorted(run.glob("checkpoints/ckpt-*.npz"))[-1])
    return {k: ckpt[k] for k in ckpt.files if k.startswith("model/")}


def assert_same_bits(runs: dict[str, Path]) -> None:
    (first_name, first), *others = ((name, final_params(run)) for name, run in runs.items())
    assert first
    for name, params in others:
        assert params.keys() == first.keys()
        for key, value in first.items():
            np.testing.assert_array_equal(params[key], value, err_msg=f"{name} vs {first_name}: {key}")


def train(tmp_path: Path, n: int, *overrides: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    run = tmp_path / f"run{n}"
    result = run_dtrain(n, *COMMON, *overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.output
    return run


@pytest.mark.blas
def test_deterministic_mode_gives_one_set_of_bits_for_any_ranks_and_threads(tmp_path, det_model):
    # 1, 2 and 3 ranks, each with the default thread budget, 1 and 2 threads; then 4, 5
    # and 6 ranks, where the 6 micro-batches do not split evenly (or one per rank).
    common = [*det_model, "parallel.deterministic=true", "trainer.max_steps=3"]
    runs = {}
    for n in (1, 2, 3):
        for threads in ("null", "1", "2"):
            runs[f"{n} ranks, threads={threads}"] = train(tmp_path / f"t{threads}", n, *common, f"threads={threads}")
    for n in (4, 5, 6):
        runs[f"{n} ranks"] = train(tmp_path, n, *common)
    assert_same_bits(runs)
    summaries = {name: json.loads((run / "summary.json").read_text()) for name, run in runs.items()}
    assert [summaries[f"{n} ranks"]["ranks"] for n in (4, 5, 6)] == [4, 5, 6]
    assert all(s["steps"] == 3 for s in summaries.values())


def test_all_reduce_training_agrees_to_float32_rounding(tmp_path):
    runs = [train(tmp_path, n, "model=lenet", "trainer.max_steps=5", "parallel.bucket_mb=0.05")
            for n in (1, 2)]
    a, b = (final_params(r) for r in runs)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_eval_accuracy_with_two_ranks_equals_one_rank(tmp_path):
    run = train(tmp_path, 1, "model=lenet", "trainer.max_steps=4")
    ckpt = sorted(run.glob("checkpoints/ckpt-*.npz"))[-1]
    metrics = []
    for n in (1, 2):
        out = tmp_path / f"eval{n}"
        result = run_dtrain(n, *COMMON, "model=lenet", "trainer.mode=eval", f"trainer.checkpoint={ckpt}",
                            f"hydra.run.dir={out}", cwd=tmp_path)
        assert result.returncode == 0, result.output
        metrics.append(json.loads((out / "eval.json").read_text()))
    # Sharded counts add up exactly: every sample once. The logits themselves come from
    # GEMMs over other batch layouts and thread counts (150 samples on one rank, 75 on
    # each of two), which round differently, so a prediction whose two top logits tie to
    # rounding may flip: at most one here, nothing like a lost or doubled shard.
    assert metrics[0]["samples"] == metrics[1]["samples"] == 150
    assert abs(metrics[0]["accuracy"] - metrics[1]["accuracy"]) * 150 <= 1 + 1e-9


def test_two_ranks_share_one_run_dir_and_only_rank_0_writes(tmp_path):
    result = run_dtrain(2, *COMMON, "model=lenet", "trainer.max_steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.output
    dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    run = dirs[0]
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert len(list(run.glob("checkpoints/ckpt-*.npz"))) == 1
    assert json.loads((run / "summary.json").read_text())["ranks"] == 2


def test_a_failing_rank_ends_the_whole_job_quickly(tmp_path):
    # MPMD launch: rank 1 gets a data set that does not exist and raises at start-up
    # while rank 0 waits for it in a collective.
    good = [sys.executable, "-m", "dtrain", *COMMON, "model=lenet", f"hydra.run.dir={tmp_path / 'r'}"]
    bad = [*good, "data=kaggle_digits", f"data.root={tmp_path / 'missing'}"]
    start = time.monotonic()
    result = launch(["-n", "1", *good, ":", "-n", "1", *bad], timeout=60, cwd=tmp_path)
    assert result.returncode != 0
    assert time.monotonic() - start < 30
    lines = [line for line in result.stderr.splitlines() if "dtrain: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("[rank 1] dtrain: error: kaggle_digits: train.csv not found"), \
        result.output
    assert "Traceback" not in result.stderr
    assert "Traceback" in (tmp_path / "r" / "dtrain-rank1.log").read_text()


@pytest.mark.blas
def test_row_partitioned_deterministic_training_is_independent_of_the_rank_count(tmp_path):
    # The row split belongs to the configuration: every micro-batch's GEMMs are cut the
    # same way whichever rank runs them. (Partitioned GEMMs equal the blockwise product
    # bitwise and the unsplit one within the GEMM error bound: tests/test_row_partition.py.)
    common = [*COMMON, "model=lenet", "trainer.max_steps=3", "dtype=float64", "parallel.devices_per_rank=2",
              "parallel.deterministic=true"]
    runs = {f"{n} ranks": train(tmp_path / f"r{n}", n, *common) for n in (1, 2)}
    assert_same_bits(runs)


@pytest.mark.blas
def test_resume_with_a_different_number_of_ranks(tmp_path, tiny_model):
    # 6 steps on 1 rank == 3 steps on 1 rank, then resumed on 2 ranks for 3 more (bitwise,
    # in deterministic mode): checkpoints do not depend on the world size that wrote them.
    common = [*tiny_model, "parallel.deterministic=true", "optim.schedule.kind=constant"]
    straight = train(tmp_path / "straight", 1, *common, "trainer.max_steps=6")
    first = train(tmp_path / "first", 1, *common, "trainer.max_steps=3")
    ckpt = sorted(first.glob("checkpoints/ckpt-*.npz"))[-1]
    resumed = train(tmp_path / "resumed", 2, *common, "trainer.max_steps=6", f"trainer.resume={ckpt}")
    assert_same_bits({"straight": straight, "resumed on 2 ranks": resumed})


@pytest.mark.blas
def test_float16_training_reduces_the_float32_master_gradient(tmp_path, tiny_model):
    # The deterministic chain takes each micro-batch's gradient after the float16 -> float32
    # cast: bitwise the same for 1 and 2 ranks. The bucketed all-reduce runs without
    # overlap (the master buffer is filled after backward) and agrees to float16 rounding.
    # A start scale of 256 overflows nowhere: micro-batches of 8 (chain) and 24 (all-reduce)
    # would otherwise skip different steps at the default 65536.
    fp16 = [*tiny_model, "precision.compute=float16", "precision.init_scale=256.0", "trainer.max_steps=4"]
    chained = [train(tmp_path / "chain", n, *fp16, "parallel.deterministic=true") for n in (1, 2)]
    chained.append(train(tmp_path / "chain2threads", 1, *fp16, "parallel.deterministic=true", "threads=2"))
    assert_same_bits({"1 rank": chained[0], "2 ranks": chained[1], "1 rank, 2 threads": chained[2]})
    a = final_params(chained[0])
    assert all(value.dtype == np.float32 for key, value in a.items() if "num_batches_tracked" not in key)
    run = tmp_path / "overlap" / "run2"
    result = run_dtrain(2, *COMMON, *fp16, "parallel.overlap=true", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.output
    assert "gradient all-reduce without overlap" in result.output
    summaries = [json.loads((r / "summary.json").read_text()) for r in (*chained, run)]
    assert [s["precision"]["skipped_steps"] for s in summaries] == [0, 0, 0, 0]
    assert summaries[3]["precision"]["compute"] == "float16" and summaries[3]["ranks"] == 2
    c = final_params(run)
    for key in a:
        np.testing.assert_allclose(c[key], a[key], rtol=2e-2, atol=2e-3, err_msg=key)
