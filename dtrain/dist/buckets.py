"""Gradient all-reduce in buckets, started while the backward pass is still running.

The flat gradient buffer is cut into contiguous *buckets* of whole parameters, planned
from the end of the buffer (the last layers, whose gradients backward produces first)
towards the start. ``Sequential.backward`` calls a hook after each layer; once every
layer with parameters in a bucket is done, that bucket's ``iallreduce`` starts, so the
reduction of late layers overlaps the backward pass of early ones. :meth:`finish` waits
for the rest and leaves ``flat.grads`` holding the mean gradient over ranks.

Determinism: the result of a reduction depends on the order in which the ranks' values
are added. For a fixed number of ranks, bucket layout and MPI/NCCL library, that order
is fixed by the collective algorithm (chosen from message size and rank count, not
timing), and every rank receives the same bits. ``deterministic=True`` additionally
reduces each bucket with the blocking ``allreduce`` in ``finish()``, in bucket order, so
no progress engine or timing is involved at all. Neither mode makes the sum independent
of the *number* of ranks; that needs rank-count-independent partial sums from the caller.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dtrain.dist.base import Communicator, Handle
from dtrain.nn.module import Module, Sequential

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


@dataclass
class StepTiming:
    """What :meth:`GradientReducer.finish` recorded: ``wait_s`` is the time spent blocked in
    ``finish`` (the communication not hidden behind backward); ``buckets`` in start order."""

    wait_s: float
    buckets: list[BucketTiming] = field(default_factory=list)


def _layer_index(name: str, num_layers: int) -> int:
    head = name.split(".", 1)[0]
    if not head.isdigit() or int(head) >= num_layers:
        raise ValueError(
            f"GradientReducer: parameter {name!r} does not belong to a child of the model's top-level "
            f"Sequential (expected names like '3.weight' with 3 < {num_layers}); build FlatParameters "
            f"from the same Sequential that is passed as model"
        )
    return int(head)


def plan_buckets(flat: "FlatParameters", num_layers: int, bucket_bytes: int) -> list[Bucket]:
    """Cut ``flat.grads`` into buckets of about ``bucket_bytes`` (at least one parameter each).

    Bucket 0 holds the *last* parameters of the buffer. The buckets tile the whole buffer
    (alignment padding included) so that reducing them all reduces every element.
    """
    itemsize = flat.grads.dtype.itemsize
    buckets: list[Bucket] = []
    stop = int(flat.grads.size)
    names: list[str] = []
    layers: set[int] = set()
    entries = sorted(flat.entries, key=lambda e: e.offset)
    for position in range(len(entries) - 1, -1, -1):
        entry = entries[position]
        names.append(entry.name)
        layers.add(_layer_index(entry.name, num_layers))
        start = 0 if position == 0 else entry.offset
        if (stop - start) * itemsize >= bucket_bytes or position == 0:
            buckets.append(Bucket(len(buckets), start, stop, (stop - start) * itemsize,
                                  frozenset(layers), tuple(names)))
            stop, names, layers = start, [], set()
    return buckets


def resolve_overlap(setting: bool | str, backend: str) -> bool:
    """``parallel.overlap``: ``true``/``false``, or ``auto`` = on for NCCL only.

    NCCL reduces on a side stream while the GPU computes, so overlap hides communication.
    MPI on host buffers does the reduction's copies and sums on the CPU cores that run the
    backward pass (Open MPI progresses it inside ``MPI_Test`` calls on the training
    thread): measured on 2 ranks x 1 core, overlap made AlexNet's backward 116 ms slower
    and hid only the 81 ms that the reduction takes after it.
    """
    if setting == "auto":
        return backend == "nccl"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"parallel.overlap must be true, false or auto; got {setting!r}")


class GradientReducer:
    """Averages ``flat.grads`` over the ranks of ``comm`` after each backward pass.

    Use: ``model.backward(g)`` (the registered hook starts buckets as layers finish),
    then ``reducer.finish()`` before the optimizer step. With ``overlap=False`` (or
    ``deterministic=True``) nothing starts during backward and ``finish`` reduces every
    bucket itself. ``finish`` is bounded by ``comm.timeout_s`` (the job aborts after it)
    and returns, and stores in ``last``, the step's :class:`StepTiming`.
    """

    def __init__(self, flat: "FlatParameters", comm: Communicator, model: Sequential,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True,
                 deterministic: bool = False) -> None:
        if not isinstance(model, Sequential):
            raise TypeError(f"GradientReducer needs the top-level Sequential model, got {type(model).__name__}")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"GradientReducer: bucket_bytes must be a positive int, got {bucket_bytes!r}")
        self.flat = flat
        self.comm = comm
        self.deterministic = deterministic
        self.overlap = overlap and not deterministic
        self.buckets = plan_buckets(flat, len(model), bucket_bytes)
        self._views = [flat.grads[b.start:b.stop] for b in self.buckets]
        self._buckets_of_layer: dict[int, list[int]] = {}
        for b in self.buckets:
            for layer in b.layers:
                self._buckets_of_layer.setdefault(layer, []).append(b.index)
        self._pending: list[set[int]] = []
        self._in_flight: list[tuple[Handle, BucketTiming]] = []
        self._reset()
        self.last: StepTiming | None = None
        model.register_backward_hook(self._on_layer_done)

    def _reset(self) -> None:
        self._pending = [set(b.layers) for b in self.buckets]
        self._in_flight = []

    def _on_layer_done(self, index: int, layer: Module) -> None:
        if not self.overlap:
            return
        for b in self._buckets_of_layer.get(index, ()):
            pending = self._pending[b]
            if index not in pending:
                raise RuntimeError(
                    f"GradientReducer: layer {index} finished backward twice in one step; call "
                    f"reducer.finish() after every backward pass (or build it with overlap=False)"
                )
            pending.discard(index)
            if not pending:
                self._start(b)
        # Open MPI advances non-blocking collectives only inside MPI calls: poke them.
        for handle, timing in self._in_flight:
            if timing.finished is None and handle.test():
                timing.finished = time.perf_counter()

    def _start(self, b: int) -> None:
        timing = BucketTiming(b, self.buckets[b].nbytes, time.perf_counter())
        self._in_flight.append((self.comm.iallreduce(self._views[b], "mean"), timing))

    def finish(self) -> StepTiming:
        """Wait for (or run) every bucket's reduction; ``flat.grads`` then holds the mean."""
        t0 = time.perf_counter()
        record = StepTiming(wait_s=0.0)
        with self.comm.watchdog.watch("gradient all-reduce"):
            if self.overlap:
                started = {timing.bucket for _, timing in self._in_flight}
                for b in range(len(self.buckets)):  # layers that never ran backward (same on every rank)
                    if b not in started:
                        self._start(b)
                for handle, timing in self._in_flight:
                    handle.wait()
                    if timing.finished is None:
                        timing.finished = time.perf_counter()
                    record.buckets.append(timing)
            else:
                for b, view in enumerate(self._views):
                    timing = BucketTiming(b, self.buckets[b].nbytes, time.perf_counter())
                    self.comm.allreduce(view, "mean")
                    timing.finished = time.perf_counter()
                    record.buckets.append(timing)
        record.wait_s = time.perf_counter() - t0
        self._reset()
        self.last = record
        return record

    def __repr__(self) -> str:
        mb = [round(b.nbytes / 2**20, 2) for b in self.buckets]
        return f"GradientReducer({len(self.buckets)} buckets, MiB={mb}, overlap={self.overlap}, comm={self.comm!r})"
