"""Elastic launch (python -m dtrain.launch): a job that loses ranks, is killed while it
writes a checkpoint, or is preempted, completes by itself, and in deterministic mode with
the bits of a run that never failed. Failures are injected by tests/chaos/sitecustomize.py."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpirun_helper import require_mpi

REPO = Path(__file__).resolve().parent.parent
CHAOS = Path(__file__).resolve().parent / "chaos"
# lenet, 20 steps of 48 images (2 epochs of 480), a checkpoint every 4 steps
COMMON = ["model=lenet", "data=mnist_sample", "data.train_size=480", "data.test_size=96", "trainer.batch_size=48",
          "trainer.epochs=2", "trainer.checkpoint_every=4", "trainer.progress=false", "logging.tensorboard=false",
          "device=cpu", "parallel.timeout_s=20", "optim.lr=0.05"]


def launch(tmp_path: Path, name: str, *overrides: str, chaos: str = "", nproc: int = 2, hostfile: Path | None = None,
           timeout: float = 300) -> tuple[subprocess.CompletedProcess, Path]:
    require_mpi()
    run = tmp_path / name
    args = [sys.executable, "-m", "dtrain.launch", "--nproc", str(nproc), "--max-restarts", "3", "--backoff", "0.2",
            "--oversubscribe"]
    if hostfile is not None:
        args += ["--hostfile", str(hostfile)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(CHAOS), str(REPO)]), DTRAIN_CHAOS=chaos, PYTHONUNBUFFERED="1")
    if hostfile is not None:
        env["DTRAIN_CHAOS_HOSTFILE"] = str(hostfile)
    proc = subprocess.run([*args, "--", *COMMON, *overrides, f"hydra.run.dir={run}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, run


def final(run: Path) -> dict[str, np.ndarray]:
    ckpt = np.load(sorted(run.glob("checkpoints/ckpt-*.npz"))[-1])
    assert int(ckpt["meta/step"]) == 20
    return {k: ckpt[k] for k in ckpt.files if k.startswith(("model/", "optim/"))}


@pytest.mark.mpi
def test_killed_ranks_a_kill_during_a_save_and_a_preemption_end_with_the_uninterrupted_bits(tmp_path):
    deterministic = ["parallel.deterministic=true"]
    straight, straight_run = launch(tmp_path, "straight", *deterministic)
    assert straight.returncode == 0, straight.stderr
    plan = "1:kill:1:6;2:killsave:0:12;3:term:1:14"  # rank 1 dies, rank 0 dies mid-save, rank 1 is preempted
    proc, run = launch(tmp_path, "chaos", *deterministic, chaos=plan)
    assert proc.returncode == 0, proc.stderr
    out = proc.stderr
    assert "attempt 1 failed" in out and "attempt 2 failed" in out and "attempt 3 preempted (exit status 75)" in out
    restarts = json.loads((run / "restarts.json").read_text())
    assert [(r["kind"], r["resumed_step"]) for r in restarts] == [("failed", 4), ("failed", 8), ("preempted", 15)]
    assert restarts[0]["reached_step"] == 6 and restarts[0]["steps_redone"] == 2
    # the save after step 12 was cut: back to step 8; the board knows step 11 had begun
    assert restarts[1]["reached_step"] == 11 and restarts[1]["steps_redone"] == 3
    assert restarts[2]["steps_redone"] == 0  # a preemption checkpoints the step it finished
    summary = json.loads((run / "summary.json").read_text())
    assert summary["restarts"]["count"] == 3 and summary["restarts"]["failed"] == 2
    assert summary["restarts"]["steps_redone"] == 5
    assert not list((run / "checkpoints").glob(".*.tmp"))
    a, b = final(straight_run), final(run)
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)


@pytest.mark.mpi
def test_a_restart_on_fewer_ranks_ends_with_the_same_bits(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    deterministic = ["parallel.deterministic=true"]
    straight, straight_run = launch(tmp_path, "straight", *deterministic)
    proc, run = launch(tmp_path, "shrunk", *deterministic, chaos="1:shrink:1:7", hostfile=hostfile)
    assert proc.returncode == 0, proc.stderr
    assert "attempt 2 on 1 rank(s)" in proc.stderr
    a, b = final(straight_run), final(run)
    for key in a:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    assert json.loads((run / "summary.json").read_text())["ranks"] == 1


@pytest.mark.mpi
def test_without_deterministic_mode_a_resumed_run_agrees_to_float32_rounding(tmp_path):
    straight, straight_run = launch(tmp_path, "straight")
    proc, run = launch(tmp_path, "chaos", chaos="1:kill:1:9")
    assert proc.returncode == 0, proc.stderr
    a, b = final(straight_run), final(run)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
    accuracy = [json.loads((r / "summary.json").read_text())["test_accuracy"] for r in (straight_run, run)]
    assert abs(accuracy[0] - accuracy[1]) <= 2 / 96


@pytest.mark.mpi
def test_the_budget_ends_a_job_that_keeps_failing(tmp_path):
    plan = ";".join(f"{attempt}:kill:1:2" for attempt in range(1, 6))
    proc, run = launch(tmp_path, "doomed", chaos=plan)
    assert proc.returncode == 3, proc.stderr  # GAVE_UP
    assert "the restart budget (--max-restarts 3) is spent: giving up" in proc.stderr


@pytest.mark.mpi
def test_a_signal_to_the_supervisor_checkpoints_and_exits_preempted(tmp_path):
    require_mpi()
    run = tmp_path / "stopped"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_"))}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "dtrain.launch", "--nproc", "2", "--oversubscribe", "--",
            *[o for o in COMMON if not o.startswith("trainer.epochs")], "trainer.epochs=200", f"hydra.run.dir={run}"]
    supervisor = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
    deadline = time.monotonic() + 120
    while not list(run.glob("checkpoints/ckpt-*.npz")) and time.monotonic() < deadline:
        time.sleep(0.2)
    supervisor.send_signal(signal.SIGUSR1)  # what Slurm's --signal=B:USR1@60 does
    _, stderr = supervisor.communicate(timeout=120)
    assert supervisor.returncode == 75, stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["signal"] == "SIGUSR1"
    assert Path(summary["checkpoint"]).is_file() and summary["step"] < 200 * 10


def test_mpirun_passes_the_rank_settings_on_to_other_nodes(tmp_path, monkeypatch):
    # mpirun copies no environment to remote nodes: NCCL_*, DTRAIN_*, BLAS threads and PYTHONPATH go with -x
    from dtrain.launch import Supervisor
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("PYTHONPATH", "/opt/lib")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    args = argparse.Namespace(nproc=4, min_ranks=1, max_restarts=3, backoff=1.0, hostfile=None, launcher="mpirun",
                              oversubscribe=False, mpirun_arg=["--bind-to", "none"])
    cmd = Supervisor(args, ["model=lenet", f"hydra.run.dir={tmp_path}"]).command(4, resume=True)
    passed = {cmd[i + 1] for i, word in enumerate(cmd) if word == "-x"}
    assert {"NCCL_SOCKET_IFNAME", "OPENBLAS_CORETYPE", "PYTHONPATH", "DTRAIN_ATTEMPT"} <= passed
    assert cmd[-3:] == ["model=lenet", f"hydra.run.dir={tmp_path}", "trainer.resume=auto"]
    assert cmd[cmd.index("-n") + 1] == "4" and "--bind-to" in cmd


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_on_one_process_checkpoints_and_the_resumed_run_has_the_uninterrupted_bits(tmp_path, sig):
    # constant LR: the uninterrupted twin may stop at the resumed run's step count
    common = [*[o for o in COMMON if not o.startswith(("trainer.epochs", "parallel.timeout_s"))],
              "optim.schedule.kind=constant", "parallel.deterministic=true"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_"))}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")

    def dtrain(name: str, *overrides: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "dtrain", *common, *overrides, f"hydra.run.dir={tmp_path / name}"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    run = tmp_path / "stopped"
    job = dtrain("stopped", "trainer.epochs=1000")
    deadline = time.monotonic() + 120
    while not list(run.glob("checkpoints/ckpt-*.npz")) and time.monotonic() < deadline:
        time.sleep(0.1)
    job.send_signal(sig)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 75, stderr
    assert "Traceback" not in stderr and f"stopped by {sig.name} after step" in stderr, stderr
    summary = json.loads((run / "summary.json").read_text())
    stopped_at = summary["step"]
    assert summary["status"] == "preempted" and 4 <= stopped_at < 10_000
    assert Path(summary["checkpoint"]).name == f"ckpt-{stopped_at:08d}.npz"

    target = f"trainer.max_steps={stopped_at + 6}"
    resumed = dtrain("stopped", "trainer.epochs=1000", "trainer.resume=auto", target)
    straight = dtrain("straight", "trainer.epochs=1000", target)
    for proc in (resumed, straight):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    a, b = (np.load(sorted((tmp_path / name).glob("checkpoints/ckpt-*.npz"))[-1]) for name in ("straight", "stopped"))
    assert int(a["meta/step"]) == int(b["meta/step"]) == stopped_at + 6
    for key in a.files:
        if key.startswith(("model/", "optim/")):
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)
