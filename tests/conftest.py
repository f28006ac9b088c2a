"""Shared fixtures: ``xp`` runs a test on NumPy and, where CuPy sees a GPU, on CuPy."""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from dtrain.backend import gpu_available


def pytest_report_header(config):
    """Which BLAS and kernel family the run uses (BLAS-sensitive results depend on it)."""
    libs = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return [f"BLAS: {lib.get('internal_api')} {lib.get('version')}, kernels {lib.get('architecture')}, "
            f"{lib.get('num_threads')} threads" for lib in libs] or ["BLAS: none found by threadpoolctl"]


def _xp_params():
    params = [pytest.param(np, id="numpy")]
    if gpu_available():
        import cupy

        params.append(pytest.param(cupy, id="cupy", marks=pytest.mark.gpu))
    else:
        params.append(
            pytest.param(None, id="cupy", marks=pytest.mark.skip(reason="CuPy or a CUDA device is missing"))
        )
    return params


@pytest.fixture(params=_xp_params())
def xp(request):
    """The array module under test (numpy, or cupy when a GPU is present)."""
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
