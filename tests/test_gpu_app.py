"""``python -m dtrain device=gpu`` end to end on the CPU stand-in for CuPy (tests/fake_cupy):
every GPU branch of the app runs in CI without a GPU, NCCL included (over MPI), and ends
where the CPU path ends, to float32 rounding.

The stand-in runs CuPy's API on NumPy and the CUDA kernels compiled for the host, so these
tests cover dtrain's GPU control flow (devices per rank, streams and events, peer copies,
the NCCL communicator, kernels' argument types, float16 twins, checkpoints of device
arrays), not the GPU's arithmetic: that is for scripts/gpu_check.sh on a real GPU.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_cupy.run import run_fake_mpi

# lenet on 480 MNIST sample images, 4 steps of batch 48: enough to move every parameter.
COMMON = ["model=lenet", "data=mnist_sample", "data.train_size=480", "data.test_size=96", "trainer.batch_size=48",
          "trainer.max_steps=4", "trainer.progress=false", "logging.tensorboard=false", "optim.lr=0.05",
          "parallel.check_interval=2"]


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory) -> str:
    """One compiled-kernel cache for every run of this module (a speed-up only)."""
    return str(tmp_path_factory.mktemp("fake_cupy_kernels"))


def dtrain_run(tmp_path: Path, name: str, ranks: int, *overrides: str, gpus: int = 2, per_rank_env=None,
               cache: str = "", timeout: float = 240) -> Path:
    """``mpirun -n ranks python -m dtrain COMMON overrides`` under the stand-in; the run dir.
    ``per_rank_env``: a list of {variable: value} per rank (an MPMD launch, e.g. each rank its
    own CUDA_VISIBLE_DEVICES)."""
    run = tmp_path / name
    app = [sys.executable, "-m", "dtrain", *COMMON, *overrides, f"hydra.run.dir={run}"]
    if per_rank_env is None:
        args = ["-n", str(ranks), *app]
    else:
        args = []
        for env in per_rank_env:
            args += [":"] if args else []
            args += ["-n", "1", "env", *(f"{k}={v}" for k, v in env.items()), *app]
    result = run_fake_mpi(args, timeout=timeout, FAKE_CUPY_GPUS=str(gpus), FAKE_CUPY_KERNEL_CACHE=cache)
    assert result.returncode == 0, result.output
    return run


def final(run: Path) -> dict[str, np.ndarray]:
    ckpt = np.load(sorted(run.glob("checkpoints/ckpt-*.npz"))[-1])
    return {k: ckpt[k] for k in ckpt.files if k.startswith("model/")}


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_close(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.mpi
def test_gpu_training_matches_the_cpu_on_one_and_two_ranks(tmp_path, kernel_cache):
    cpu = dtrain_run(tmp_path, "cpu", 1, "device=cpu")
    gpu = dtrain_run(tmp_path, "gpu", 1, "device=gpu", cache=kernel_cache)
    nccl = dtrain_run(tmp_path, "nccl", 2, "device=gpu", "logging.timeline=true", cache=kernel_cache)
    assert summary(gpu)["device"] == "gpu" and summary(nccl)["ranks"] == 2
    assert summary(nccl)["phase_breakdown"]["clock"] == "cuda_events"
    assert summary(gpu)["peak_device_bytes"] > 0
    assert (nccl / "timeline-rank1.json").is_file()
    assert_close(final(gpu), final(cpu))
    assert_close(final(nccl), final(cpu))


@pytest.mark.mpi
def test_gpu_float16_training_keeps_float32_masters(tmp_path, kernel_cache):
    cpu = dtrain_run(tmp_path, "cpu", 1, "device=cpu")
    half = dtrain_run(tmp_path, "half", 2, "device=gpu", "precision.compute=float16", "precision.init_scale=256.0",
                      cache=kernel_cache)
    s = summary(half)
    assert s["precision"]["compute"] == "float16" and s["precision"]["skipped_steps"] == 0
    params = final(half)
    assert all(v.dtype == np.float32 for v in params.values())
    assert_close(params, final(cpu), rtol=2e-2, atol=2e-3)  # float16 rounding in forward and backward


@pytest.mark.mpi
def test_gpu_row_partitioning_on_one_and_two_ranks(tmp_path, kernel_cache):
    cpu = dtrain_run(tmp_path, "cpu", 1, "device=cpu")
    one = dtrain_run(tmp_path, "one", 1, "device=gpu", "parallel.devices_per_rank=2", cache=kernel_cache)
    two = dtrain_run(tmp_path, "two", 2, "device=gpu", "parallel.devices_per_rank=2", gpus=4, cache=kernel_cache)
    assert_close(final(one), final(cpu))
    assert_close(final(two), final(cpu))


@pytest.mark.mpi
def test_ranks_that_each_see_only_their_own_gpus(tmp_path, kernel_cache):
    # What Slurm's --gpus-per-task does: every rank's GPUs are its devices 0 and 1.
    per_rank = [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    run = dtrain_run(tmp_path, "visible", 2, "device=gpu", "parallel.devices_per_rank=2", gpus=4,
                     per_rank_env=per_rank, cache=kernel_cache)
    assert summary(run)["ranks"] == 2


@pytest.mark.mpi
def test_gpu_checkpoint_resume_and_eval(tmp_path, kernel_cache):
    straight = dtrain_run(tmp_path, "straight", 1, "device=gpu", "trainer.checkpoint_every=2",
                          "optim.schedule.kind=constant", cache=kernel_cache)
    first = dtrain_run(tmp_path, "first", 1, "device=gpu", "trainer.max_steps=2", "optim.schedule.kind=constant",
                       cache=kernel_cache)
    ckpt = sorted(first.glob("checkpoints/ckpt-*.npz"))[-1]
    resumed = dtrain_run(tmp_path, "resumed", 2, "device=gpu", "optim.schedule.kind=constant",
                         f"trainer.resume={ckpt}", cache=kernel_cache)
    assert_close(final(resumed), final(straight))
    evaluated = dtrain_run(tmp_path, "eval", 2, "device=gpu", "trainer.mode=eval",
                           f"trainer.checkpoint={sorted(straight.glob('checkpoints/ckpt-*.npz'))[-1]}",
                           cache=kernel_cache)
    metrics = json.loads((evaluated / "eval.json").read_text())
    assert metrics["samples"] == 96
    assert abs(metrics["accuracy"] - summary(straight)["test_accuracy"]) * 96 <= 1 + 1e-9
