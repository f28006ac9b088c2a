"""launch/slurm.sbatch on a real single-node Slurm cluster (opt-in: DTRAIN_SLURM_TEST=1, as root).

The fixture installs Debian's slurm-wlm and munge when they are missing (apt-get), writes
a slurm.conf with this machine as the one node, and starts munged, slurmctld and slurmd;
the tests submit launch/slurm.sbatch with sbatch and check a plain run, an elastic restart
after a killed rank, and the path of a time limit: Slurm's --signal warning makes the job
checkpoint, stop and requeue itself, and the requeued job finishes the run.

    DTRAIN_SLURM_TEST=1 bash scripts/test.sh tests/test_slurm.py     # about 5 minutes
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHAOS = Path(__file__).resolve().parent / "chaos"
SCRIPT = REPO / "launch" / "slurm.sbatch"

pytestmark = pytest.mark.skipif(os.environ.get("DTRAIN_SLURM_TEST") != "1",
                                reason="opt-in: DTRAIN_SLURM_TEST=1 (installs and starts Slurm; needs root)")

# lenet on synthetic data, CPU ranks
TRAIN = ["model=lenet", "data=synthetic", "trainer.batch_size=48", "device=cpu", "trainer.progress=false",
         "logging.tensorboard=false", "trainer.checkpoint_every=4"]


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict[str, str]:
    """The environment for Slurm's commands (SLURM_CONF) of a freshly started cluster."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd and munged needs root")
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        installed = run("apt-get", "install", "-y", "-q", "slurm-wlm", "munge", timeout=900)
        assert installed.returncode == 0, installed.stdout + installed.stderr
    home = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (home / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    memory_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 512
    conf = home / "slurm.conf"
    conf.write_text(f"""ClusterName=dtraintest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={home}/state
SlurmdSpoolDir={home}/spool
SlurmctldPidFile={home}/slurmctld.pid
SlurmdPidFile={home}/slurmd.pid
SlurmctldLogFile={home}/log/slurmctld.log
SlurmdLogFile={home}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        assert run("mungekey", "--create").returncode == 0 or run(
            "dd", "if=/dev/urandom", f"of={key}", "bs=1024", "count=1").returncode == 0
    run("chown", "munge:munge", str(key))
    key.chmod(0o400)
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    run("chown", "munge:munge", "/run/munge")
    if run("pgrep", "-x", "munged").returncode != 0:
        started = run("runuser", "-u", "munge", "--", "munged")
        assert started.returncode == 0, started.stderr
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for daemon in ("slurmctld", "slurmd"):
        started = run(daemon, "-f", str(conf), env=env)
        assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 60
    while "idle" not in run("sinfo", "-h", "-o", "%T", env=env).stdout and time.monotonic() < deadline:
        time.sleep(1)
    assert "idle" in run("sinfo", "-h", "-o", "%T", env=env).stdout, (home / "log" / "slurmctld.log").read_text()
    yield env
    run("scancel", "--full", "--user=root", env=env)
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        if (home / pid_file).exists():
            run("kill", (home / pid_file).read_text().strip())


def submit(env: dict[str, str], workdir: Path, *overrides: str, options: tuple[str, ...] = (),
           extra_env: dict[str, str] | None = None) -> str:
    """sbatch launch/slurm.sbatch from ``workdir``; the job id."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_env = {**env, "DTRAIN_PYTHON": sys.executable, **(extra_env or {})}
    job_env.pop("OMPI_COMM_WORLD_SIZE", None)
    done = run("sbatch", "--parsable", "--ntasks=2", *options, str(SCRIPT), *overrides, cwd=workdir, env=job_env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def wait_gone(env: dict[str, str], job: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while run("squeue", "-h", "-j", job, env=env).stdout.strip():
        assert time.monotonic() < deadline, run("scontrol", "show", "job", job, env=env).stdout
        time.sleep(3)


def test_the_batch_script_trains_inside_the_allocation(cluster, tmp_path):
    job = submit(cluster, tmp_path, *TRAIN, "data.train_size=480", "trainer.max_steps=20",
                 options=("--time=00:05:00",))
    wait_gone(cluster, job, 300)
    summary = json.loads((tmp_path / f"outputs/slurm-{job}/summary.json").read_text())
    assert summary["steps"] == 20 and summary["ranks"] == 2
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert "dtrain.launch: starting ranks with" in out and "the run finished after 0 restart(s)" in out


def test_a_killed_rank_is_restarted_inside_the_allocation(cluster, tmp_path):
    chaos = {"PYTHONPATH": os.pathsep.join([str(CHAOS), str(REPO)]), "DTRAIN_CHAOS": "1:kill:1:6"}
    job = submit(cluster, tmp_path, *TRAIN, "data.train_size=480", "trainer.max_steps=20",
                 "parallel.timeout_s=20", options=("--time=00:05:00",), extra_env=chaos)
    wait_gone(cluster, job, 300)
    run_dir = tmp_path / f"outputs/slurm-{job}"
    restarts = json.loads((run_dir / "restarts.json").read_text())
    assert [r["kind"] for r in restarts] == ["failed"] and restarts[0]["resumed_step"] == 4
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 20


def test_the_time_limit_warning_checkpoints_stops_and_requeues(cluster, tmp_path):
    # A one-minute limit with the warning 50 s before it: the job is told ~10 s in, stops
    # with a checkpoint, requeues itself (Slurm starts it again ~2 minutes later) and the
    # requeued job finishes the run from that checkpoint.
    job = submit(cluster, tmp_path, *TRAIN, "data.train_size=48000", "trainer.max_steps=6000",
                 options=("--time=1", "--signal=B:USR1@50"))
    wait_gone(cluster, job, 900)
    run_dir = tmp_path / f"outputs/slurm-{job}"
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert "stopped by SIGUSR1 after step" in out and f"requeueing job {job}" in out, out
    restarts = json.loads((run_dir / "restarts.json").read_text())
    assert restarts and all(r["kind"] == "preempted" for r in restarts)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6000 and summary["restarts"]["count"] == len(restarts)
