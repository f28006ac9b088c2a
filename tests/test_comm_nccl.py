"""NCCL backend under mpirun, one rank per GPU (up to 2); skipped without CuPy and a GPU."""
from __future__ import annotations

import pytest
from mpirun_helper import assert_ok, run_mpi

from dtrain.backend import gpu_available

pytestmark = [pytest.mark.gpu, pytest.mark.mpi,
              pytest.mark.skipif(not gpu_available(), reason="CuPy or a CUDA device is missing")]


def test_nccl_collectives_and_reducer():
    import cupy

    n = min(2, cupy.cuda.runtime.getDeviceCount())
    assert_ok(run_mpi("nccl_collectives.py", n, timeout=180), n)
