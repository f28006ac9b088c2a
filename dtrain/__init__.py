"""dtrain: convolutional networks from scratch on NumPy/CuPy, trained data-parallel with MPI and NCCL.

This module imports nothing heavy, so that :func:`limit_openblas_spin` can run before NumPy.
"""
import os

# 2**16 CPU cycles, tens of microseconds: enough to bridge back-to-back GEMMs.
OPENBLAS_THREAD_TIMEOUT = "16"


def limit_openblas_spin() -> None:
    """Shorten how long OpenBLAS's idle threads spin after a GEMM; call before NumPy is imported.

    After every GEMM, OpenBLAS's worker threads spin for 2**28 CPU cycles (about a tenth of
    a second) before they sleep, on the cores that dtrain's own kernels (im2col, pooling,
    optimizers) use between GEMMs. OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` once, when it
    is loaded; a value already in the environment wins. ``python -m dtrain`` and the
    benchmarks call this first (the README's Performance section has the measurements).
    """
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)
