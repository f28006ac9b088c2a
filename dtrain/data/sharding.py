"""Splitting ``n`` items among ``world_size`` ranks: contiguous, as even as possible, each item once."""
from __future__ import annotations

import numpy as np

from dtrain.checks import check_int


def check_rank(rank: int, world_size: int) -> None:
    """``ValueError`` unless ``world_size >= 1`` and ``0 <= rank < world_size``."""
    check_int(world_size, "world_size", 1)
    check_int(rank, "rank", 0, world_size)


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s share of ``range(n)``.

    The first ``n % world_size`` ranks hold one item more than the others; ranks past the
    end hold an empty share when ``n < world_size``.
    """
    check_rank(rank, world_size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """The int64 indices of rank ``rank``'s contiguous share of ``range(n)`` (for sharded evaluation:
    the ranks' shares, concatenated in rank order, are ``0..n-1`` exactly once)."""
    start, stop = shard_bounds(n, rank, world_size)
    return np.arange(start, stop, dtype=np.int64)
