"""Data-parallel gradient averaging: one interface, one class per strategy.

A :class:`GradientAveraging` computes this rank's gradient of a global batch and leaves
the mean over all ranks in the master model's flat gradient buffer. The training loop
calls :meth:`~GradientAveraging.compute` once per step and does not know which strategy
runs; :func:`dtrain.train` picks one at set-up:

* :class:`AllReduceGradients`: forward and backward of the whole local batch, then each
  bucket of the gradient buffer all-reduced in turn (blocking);
* :class:`OverlappedAllReduceGradients`: the same buckets, but each starts (non-blocking)
  as soon as backward has finished the layers that fill it, so the reduction of late
  layers overlaps the backward pass of early ones;
* :class:`~dtrain.parallel.ordered.OrderedChainGradients`: deterministic mode, fixed
  micro-batches summed in one global order (the same bits for any rank and thread count).

With the all-reduce strategies the sum's order is the collective algorithm's, which
depends on the rank count, so results agree across rank counts to rounding only.
"""
from __future__ import annotations

import abc
import time
from typing import TYPE_CHECKING

from dtrain.comm.base import Communicator, Handle
from dtrain.nn.module import Module
from dtrain.parallel.buckets import BucketTiming, plan_buckets

if TYPE_CHECKING:
    from dtrain.data.loader import Batch
    from dtrain.nn.flat import FlatParameters
    from dtrain.parallel.workers import ComputeWorker, Timer


class GradientAveraging(abc.ABC):
    """The mean gradient of a global batch over all ranks, in the master flat gradient buffer."""

    @abc.abstractmethod
    def compute(self, batch: Batch, step: int, timer: Timer) -> tuple[float, int, int]:
        """Forward and backward of this rank's share of the global batch ``batch``, then the
        averaging; returns (loss sum, correct predictions, samples) over the local samples.
        ``step`` keys the dropout masks; ``timer`` gets the forward, backward and comm phases."""

    def close(self) -> None:
        """Release what the strategy holds (worker threads)."""


class AllReduceGradients(GradientAveraging):
    """The local batch on ``worker`` (the compute model), then a blocking all-reduce (mean)
    of each bucket of ``flat.grads`` in bucket order."""

    def __init__(self, worker: ComputeWorker, flat: FlatParameters, comm: Communicator, bucket_bytes: int) -> None:
        self.worker = worker
        self.flat = flat
        self.comm = comm
        self.buckets = plan_buckets(flat, bucket_bytes)
        self._views = [flat.grads[b.start:b.stop] for b in self.buckets]

    def compute(self, batch: Batch, step: int, timer: Timer) -> tuple[float, int, int]:
        stats = self.worker.forward_backward(batch.x, batch.y, step, batch.sample_ids, timer, sync_master=True)
        with timer.phase("comm"):
            timer.add_buckets(self.reduce())
        return stats

    def reduce(self) -> list[BucketTiming]:
        """Replace ``flat.grads`` by its mean over the ranks, bucket by bucket; returns each
        bucket's timing. Bounded by the communicator's collective timeout."""
        with self.comm.watchdog.watch("gradient all-reduce"):
            return self._reduce()

    def _reduce(self) -> list[BucketTiming]:
        timings = []
        for bucket, view in zip(self.buckets, self._views):
            timing = BucketTiming(bucket.index, bucket.nbytes, time.perf_counter())
            self.comm.allreduce(view, "mean")
            timing.finished = time.perf_counter()
            timings.append(timing)
        return timings

    def __repr__(self) -> str:
        mib = [round(b.nbytes / 2**20, 2) for b in self.buckets]
        return f"{type(self).__name__}({len(self.buckets)} buckets, MiB={mib}, comm={self.comm!r})"


class OverlappedAllReduceGradients(AllReduceGradients):
    """Like :class:`AllReduceGradients`, but a bucket's non-blocking all-reduce starts from
    :meth:`layer_done` once every layer with parameters in it has run backward. The
    compute model's backward must call :meth:`layer_done` after each top-level layer
    (register it with ``Sequential.register_backward_hook``); its gradients must be the
    master buffer's (float32 compute)."""

    def __init__(self, worker: ComputeWorker, flat: FlatParameters, comm: Communicator, bucket_bytes: int) -> None:
        super().__init__(worker, flat, comm, bucket_bytes)
        if worker.flat is not flat:
            raise ValueError("OverlappedAllReduceGradients needs the compute model to write the master gradients "
                             "(float32 compute); use AllReduceGradients with a float16 compute twin")
        self._buckets_of_layer: dict[int, list[int]] = {}
        for b in self.buckets:
            for layer in b.layers:
                self._buckets_of_layer.setdefault(layer, []).append(b.index)
        self._pending = [set(b.layers) for b in self.buckets]
        self._in_flight: list[tuple[Handle, BucketTiming]] = []

    def layer_done(self, index: int, layer: Module) -> None:
        """Backward hook: top-level layer ``index`` has written its gradients."""
        for b in self._buckets_of_layer.get(index, ()):
            pending = self._pending[b]
            if index not in pending:
                raise RuntimeError(f"{type(self).__name__}: layer {index} finished backward twice in one step")
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

    def _reduce(self) -> list[BucketTiming]:
        """Wait for the buckets started during backward and reduce the others."""
        started = {timing.bucket for _, timing in self._in_flight}
        for b in range(len(self.buckets)):  # layers that never ran backward (the same on every rank)
            if b not in started:
                self._start(b)
        timings = []
        for handle, timing in self._in_flight:
            handle.wait()
            if timing.finished is None:
                timing.finished = time.perf_counter()
            timings.append(timing)
        self._pending = [set(b.layers) for b in self.buckets]
        self._in_flight = []
        return timings
