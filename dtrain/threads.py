"""BLAS thread budget per process: all cores for one process, one per rank under MPI."""
from __future__ import annotations

import logging
import os

from threadpoolctl import ThreadpoolController, threadpool_limits

log = logging.getLogger("dtrain")
_limiter = None
_blas_controllers = None  # threadpoolctl's handles on the loaded BLAS libraries, found once


def blas_threads_for(threads: int | None, world_size: int) -> int:
    """The BLAS thread count to use: ``threads`` if given, else cores (1 per rank when size > 1)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 or null; got {threads}")
        return int(threads)
    return 1 if world_size > 1 else (os.cpu_count() or 1)


def limit_blas_threads(threads: int | None, world_size: int) -> int:
    """Cap this process's BLAS (OpenBLAS/MKL) thread pool; returns the count applied."""
    global _limiter
    n = blas_threads_for(threads, world_size)
    _limiter = threadpool_limits(limits=n, user_api="blas")
    return n


def current_blas_threads() -> int:
    """The BLAS thread count in force now: the process's thread budget.

    :func:`limit_blas_threads`, a ``threadpool_limits`` block or the row partitioner may
    have changed it. With several BLAS libraries loaded, the smallest count (never
    oversubscribe); 1 when none is. Reading it is a library call (about a microsecond);
    the libraries are looked up on first use.
    """
    global _blas_controllers
    if _blas_controllers is None:
        _blas_controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    return max(1, min([c.get_num_threads() or 1 for c in _blas_controllers], default=1))
