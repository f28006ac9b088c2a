"""Keeping the replicas identical: start-up broadcast, a cheap divergence check, and the
all-reduce behind synchronized BatchNorm."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from dtrain.backend import get_array_module
from dtrain.comm.base import Communicator
from dtrain.nn.module import Array, Module

if TYPE_CHECKING:
    from dtrain.nn.flat import FlatParameters

_BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}  # float itemsize -> same-width unsigned int


class RankDivergedError(RuntimeError):
    """Replicas that should be identical are not. ``ranks`` are the offending ranks,
    ``kind`` is ``"nonfinite"`` (NaN/Inf in their parameters) or ``"diverged"``."""

    def __init__(self, message: str, step: int, ranks: list[int], kind: str) -> None:
        super().__init__(message)
        self.step = step
        self.ranks = ranks
        self.kind = kind


def _as_1d(arr: Array, name: str) -> Array:
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} is not a contiguous array; cannot broadcast it in place")
    return arr.reshape(-1)


def broadcast_parameters(comm: Communicator, model: Module) -> None:
    """Copy rank 0's parameters and buffers (e.g. BatchNorm running stats) to every rank, in place."""
    if comm.size == 1:
        return
    for name, mod, key in model.named_parameters():
        comm.broadcast(_as_1d(mod.params[key], name), root=0)
    for name, mod, key in model.named_buffers():
        comm.broadcast(_as_1d(mod.buffers[key], name), root=0)


def params_checksum(params: Array) -> tuple[int, float]:
    """(exact bit checksum, float64 sum) of a 1-D float array.

    The bit checksum adds the raw bit patterns as unsigned integers modulo 2**64: it does
    not depend on summation order or memory alignment, so identical arrays always give
    identical checksums. The float64 sum is for humans, and is non-finite exactly when
    some element is NaN or infinite (float32/16 values cannot overflow it).
    """
    xp = get_array_module(params)
    bits = params.view(_BITS[params.dtype.itemsize])
    return int(xp.sum(bits, dtype=xp.uint64)), float(xp.sum(params, dtype=xp.float64))


def check_consistency(comm: Communicator, flat: FlatParameters, step: int) -> None:
    """Raise :class:`RankDivergedError` on every rank if the ranks' parameters differ or
    some rank has NaN/Inf in them.

    One small object all-gather of ``(bit checksum, float64 sum)``. Divergence names the
    ranks outside the largest group of agreeing ranks (ties: the group of rank 0).
    """
    checksums = comm.allgather_object(params_checksum(flat.params))
    nonfinite = [r for r, (_, total) in enumerate(checksums) if not np.isfinite(total)]
    if nonfinite:
        raise RankDivergedError(
            f"step {step}: rank(s) {nonfinite} have NaN or Inf in their parameters; training "
            f"diverged (lower the learning rate, check the input data, or use float64)",
            step, nonfinite, "nonfinite",
        )
    counts = Counter(bits for bits, _ in checksums)
    if len(counts) == 1:
        return
    reference = max(counts, key=lambda bits: (counts[bits], bits == checksums[0][0]))
    agree = [r for r, (bits, _) in enumerate(checksums) if bits == reference]
    diverged = [r for r, (bits, _) in enumerate(checksums) if bits != reference]
    detail = ", ".join(f"rank {r}: sum {total!r}" for r, (_, total) in enumerate(checksums))
    raise RankDivergedError(
        f"step {step}: parameters differ across ranks: rank(s) {diverged} disagree with rank(s) {agree} "
        f"({detail}). Replicas must start equal (broadcast_parameters) and apply identical "
        f"updates; look for rank-dependent randomness or a layer that skips the gradient reduction",
        step, diverged, "diverged",
    )


def make_stats_reducer(comm: Communicator) -> Callable[[Array], Array]:
    """A function summing a 1-D statistics array over ranks (for synchronized BatchNorm).

    It reduces in place when the array is contiguous (and reduces a contiguous copy
    otherwise) and returns the summed array. The reduction is bounded by ``comm.timeout_s``.
    """

    def reduce_stats(stats: Array) -> Array:
        buf = get_array_module(stats).ascontiguousarray(stats)
        with comm.watchdog.watch("BatchNorm statistics all-reduce"):
            comm.allreduce(buf, "sum")
        return buf

    return reduce_stats
