"""Gradient buckets: contiguous runs of whole parameters of the flat gradient buffer.

Buckets are planned from the end of the buffer (the last layers, whose gradients the
backward pass produces first) towards the start, each about ``bucket_bytes``; together
they tile the whole buffer (alignment padding included), so reducing them all reduces
every element. Each bucket knows the top-level layers whose parameters it holds (the
``layer`` of each :class:`~dtrain.nn.flat.FlatEntry`), which is what lets a reduction
start as soon as backward has finished those layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dtrain.checks import check_int

if TYPE_CHECKING:
    from dtrain.nn.flat import FlatParameters

DEFAULT_BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class Bucket:
    """``flat.grads[start:stop]``, holding the parameters ``names`` of top-level ``layers``."""

    index: int
    start: int
    stop: int
    nbytes: int
    layers: frozenset[int]
    names: tuple[str, ...]


@dataclass
class BucketTiming:
    """One bucket's reduction in one step: ``started``/``finished`` are ``time.perf_counter()``
    values; ``finished`` is when completion was first observed (a poke or the wait)."""

    bucket: int
    nbytes: int
    started: float
    finished: float | None = None

    @property
    def seconds(self) -> float:
        if self.finished is None:
            raise ValueError(f"bucket {self.bucket}'s reduction has not been seen to finish yet")
        return self.finished - self.started


def plan_buckets(flat: FlatParameters, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """Cut ``flat.grads`` into buckets of about ``bucket_bytes`` (at least one parameter each).

    Bucket 0 holds the *last* parameters of the buffer.
    """
    check_int(bucket_bytes, "plan_buckets: bucket_bytes", 1)
    itemsize = flat.grads.dtype.itemsize
    buckets: list[Bucket] = []
    stop = int(flat.grads.size)
    names: list[str] = []
    layers: set[int] = set()
    entries = sorted(flat.entries, key=lambda e: e.offset)
    for position in range(len(entries) - 1, -1, -1):
        entry = entries[position]
        names.append(entry.name)
        layers.add(entry.layer)
        start = 0 if position == 0 else entry.offset
        if (stop - start) * itemsize >= bucket_bytes or position == 0:
            buckets.append(Bucket(len(buckets), start, stop, (stop - start) * itemsize,
                                  frozenset(layers), tuple(names)))
            stop, names, layers = start, [], set()
    return buckets
