"""The process's CPU thread budget and the one handle on its BLAS thread pool.

A process gets ``threads`` cores if the config says so, else every core when it runs
alone and one per rank under MPI (:func:`thread_budget`). The budget is applied to the
BLAS library (OpenBLAS or MKL, found through threadpoolctl once per process) and read
back by the code that spreads memory-bound work over threads (:mod:`dtrain.nn.blocks`),
so GEMMs and copies use the same cores and no more.

The BLAS libraries are looked up once, at first use: one loaded later is not controlled.
That can happen to SciPy's OpenBLAS, which Numba's compiler loads (:mod:`dtrain.nn.cpu_kernels`)
and which nothing in dtrain calls.

OpenBLAS built with pthreads (NumPy's wheels) has one process-wide thread count, so
:func:`blas_threads` changes it for the whole process; call it from the thread that
drives the work, never from two threads at once.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from threadpoolctl import ThreadpoolController

from dtrain.checks import check_int

_controllers: list[Any] | None = None  # threadpoolctl's handles on the loaded BLAS libraries


def _blas_libraries() -> list[Any]:
    """threadpoolctl's controllers of the BLAS libraries loaded in this process, found once
    (after NumPy is imported, which loads its BLAS)."""
    global _controllers
    if _controllers is None:
        import numpy  # noqa: F401  (loads NumPy's BLAS before the search)

        _controllers = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _controllers


def thread_budget(threads: int | None, world_size: int) -> int:
    """The cores one process may use: ``threads`` if given, else all (1 per rank when size > 1)."""
    if threads is not None:
        return check_int(threads, "threads", 1)
    return 1 if world_size > 1 else usable_cores()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_blas_threads(n: int) -> None:
    """Set the BLAS thread count of the whole process to ``n``."""
    for lib in _blas_libraries():
        lib.set_num_threads(n)


def current_blas_threads() -> int:
    """The BLAS thread count in force now; with several BLAS libraries the smallest
    (never oversubscribe), 1 when none is loaded. A library call, about a microsecond."""
    return max(1, min([lib.get_num_threads() or 1 for lib in _blas_libraries()], default=1))


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with the process's BLAS thread count set to ``n``, restored afterwards."""
    before = current_blas_threads()
    set_blas_threads(n)
    try:
        yield
    finally:
        set_blas_threads(before)
