"""Running Python code under the fake CuPy, from tests (the pytest process never imports it).

``run_fake(code)`` runs a snippet in a fresh interpreter whose ``import cupy`` is the fake
(``tests/fake_cupy`` first on ``PYTHONPATH``, then the repository for ``dtrain``);
``run_fake_mpi(app_args)`` runs ``mpirun app_args`` the same way, e.g.
``["-n", "2", *python_command(code)]``. Both add the given environment variables, and
fail the calling test after ``timeout`` seconds. The device setup comes only from what
the test passes: ``CUDA_VISIBLE_DEVICES`` and the fake's behaviour switches are dropped
from the inherited environment (``FAKE_CUPY_KERNEL_CACHE``, a pure speed-up, is kept).
Import as ``from fake_cupy.run import run_fake`` (``tests`` is on ``sys.path`` in dtrain's
test runs).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FAKE_DIR = Path(__file__).resolve().parent
REPO = FAKE_DIR.parent.parent
# Inherited variables that would change the fake's devices or behaviour.
_SETUP = ("CUDA_VISIBLE_DEVICES", "FAKE_CUPY_GPUS", "FAKE_CUPY_PEER_ACCESS", "FAKE_CUPY_KERNEL_LOG")


def fake_pythonpath() -> str:
    """``PYTHONPATH`` for a process that should import the fake CuPy and this checkout's dtrain."""
    return os.pathsep.join(filter(None, [str(FAKE_DIR), str(REPO), os.environ.get("PYTHONPATH")]))


def python_command(code: str) -> list[str]:
    """``python -c code`` (dedented) with the running interpreter."""
    return [sys.executable, "-c", textwrap.dedent(code)]


def run_fake(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` under the fake CuPy with ``env`` added; the result has ``returncode``,
    ``stdout`` and ``stderr``."""
    inherited = {k: v for k, v in os.environ.items() if k not in _SETUP}
    full_env = {**inherited, "PYTHONPATH": fake_pythonpath(), "PYTHONUNBUFFERED": "1", **env}
    try:
        return subprocess.run(python_command(code), capture_output=True, text=True, env=full_env, cwd=REPO,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the fake-CuPy snippet did not end within {timeout} s\nstdout:\n{err.stdout}\n"
                    f"stderr:\n{err.stderr}")


def run_fake_mpi(app_args: list[str], timeout: float = 120, **env: str):
    """``mpirun app_args`` under the fake CuPy, through ``mpirun_helper.launch`` (skips
    without MPI, kills the job after ``timeout``); returns its ``MpiResult``."""
    from mpirun_helper import launch

    with pytest.MonkeyPatch.context() as patch:
        for name in _SETUP:
            patch.delenv(name, raising=False)
        patch.setenv("PYTHONPATH", fake_pythonpath())  # launch() puts the repository first: no cupy there
        for name, value in env.items():
            patch.setenv(name, value)
        return launch(app_args, timeout, REPO)
