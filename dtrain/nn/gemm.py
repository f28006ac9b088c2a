"""The one GEMM entry point that Conv2d and Linear use for all their matrix products.

By default it is a plain ``xp.matmul``. Inside ``with RowPartitioner(devices):`` (see
:mod:`dtrain.parallel.row_partition`) every product is routed through the partitioner
instead, which splits the rows of ``a`` across devices.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dtrain.backend import get_array_module

Partitioner = Callable[[Any, Any, Any], Any]  # (a, b, out) -> a @ b written into out

_partitioner: Partitioner | None = None


def set_partitioner(fn: Partitioner | None) -> Partitioner | None:
    """Route every layer GEMM through ``fn(a, b, out)`` (``None``: plain matmul); returns
    the routing it replaces."""
    global _partitioner
    previous, _partitioner = _partitioner, fn
    return previous


def matmul(a: Any, b: Any, out: Any = None) -> Any:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N), written into ``out`` (M, N) if given."""
    if _partitioner is not None:
        return _partitioner(a, b, out)
    xp = get_array_module(a)
    return xp.matmul(a, b, out=out)


def partitioned() -> bool:
    """Whether layer GEMMs are routed through a row partitioner."""
    return _partitioner is not None
