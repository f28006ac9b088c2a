"""Deterministic gradient averaging: the same bits for any number of ranks and threads.

A plain all-reduce sums each rank's partial gradient, and the partials (how a batch is
split), the reduction order and the BLAS kernels' thread splits all change with the
number of ranks and threads, so results agree only to rounding. Here the order of every
floating-point operation is fixed by the configuration alone:

* the global batch is cut into a fixed number of micro-batches (``chunks``); rank ``r``
  of ``n`` takes the ``r``-th of ``n`` contiguous runs of them (as even as possible, so
  any rank count up to ``chunks`` works);
* each micro-batch's forward and backward pass runs with a one-thread BLAS, so its
  gradient does not depend on which thread or rank computes it; a rank's cores are used
  by computing several of its micro-batches at once on a
  :class:`~dtrain.parallel.workers.WorkerPool`;
* the micro-batch gradients are summed in the one global order ``((g0 + g1) + g2) + ...``:
  rank ``r`` receives the running sum from rank ``r-1``, adds its own micro-batches in
  order and passes it on; the last rank broadcasts the total, and every rank multiplies
  it by ``1 / chunks``;
* BatchNorm running statistics are recorded per micro-batch and applied on every rank in
  the global micro-batch order (one small all-gather per step), so they too are
  independent of the split.

One process with one thread does exactly the same arithmetic, so the averaged gradient,
and every parameter after the optimizer step, is bitwise identical for any rank count
and thread count on a given CPU and BLAS build (different CPU families run different
GEMM kernels, which round differently).

Cost: micro-batches are smaller GEMMs than the whole local batch; ``size - 1``
sequential sends plus a broadcast of the gradient buffer per step; on ranks > 0 a copy
of each own micro-batch gradient until the running sum arrives.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from dtrain.backend import get_array_module, to_host
from dtrain.checks import check_int
from dtrain.comm.base import Communicator
from dtrain.nn.batchnorm import BatchNorm1d, BatchNorm2d
from dtrain.nn.blocks import split_evenly
from dtrain.nn.module import Module
from dtrain.parallel.gradients import GradientAveraging
from dtrain.precision import PrecisionPolicy

if TYPE_CHECKING:
    from dtrain.data.loader import Batch
    from dtrain.nn.flat import FlatParameters
    from dtrain.parallel.workers import ComputeWorker, Timer, WorkerPool


def chunk_range(chunks: int, rank: int, size: int) -> tuple[int, int]:
    """``(first, stop)``: the micro-batches of rank ``rank`` of ``size`` (contiguous, as even as possible)."""
    if size > chunks:
        raise ValueError(
            f"deterministic mode splits each global batch into parallel.deterministic_chunks={chunks} "
            f"micro-batches, fewer than the {size} ranks; set parallel.deterministic_chunks >= {size}"
        )
    return split_evenly(chunks, size)[rank]


def batch_norms(model: Module) -> list[BatchNorm1d | BatchNorm2d]:
    """The BatchNorm layers of ``model`` in module order."""
    return [layer for _, layer in model.named_modules() if isinstance(layer, (BatchNorm1d, BatchNorm2d))]


class OrderedChainGradients(GradientAveraging):
    """Computes and averages the gradient of a global batch in a rank- and thread-independent order.

    ``flat`` is the master model's flat buffers; ``master`` that model (its BatchNorm
    running statistics are updated here); ``pool`` the workers that run this rank's
    micro-batches (see :mod:`dtrain.parallel.workers`); ``precision`` the policy that
    prepares the compute model and unscales its gradients into the master dtype.
    :meth:`compute` leaves the mean gradient over all ``chunks`` micro-batches in
    ``flat.grads`` on every rank.
    """

    def __init__(self, flat: FlatParameters, comm: Communicator, chunks: int, pool: WorkerPool,
                 precision: PrecisionPolicy, master: Module) -> None:
        check_int(chunks, "OrderedChainGradients: chunks", 1)
        self.first, self.stop = chunk_range(chunks, comm.rank, comm.size)
        self.flat = flat
        self.comm = comm
        self.chunks = chunks
        self.local_chunks = self.stop - self.first
        self.pool = pool
        self.precision = precision
        xp = get_array_module(flat.grads)
        self._sum = xp.zeros_like(flat.grads)
        # Rank 0 starts the global order and adds as it goes; later ranks hold their
        # micro-batch gradients until the running sum of the ranks before them arrives.
        self._held = [xp.empty_like(flat.grads) for _ in range(self.local_chunks)] if comm.rank else []
        self._unscaled = xp.empty_like(flat.grads) if precision.mixed and not comm.rank else None
        self._master_norms = batch_norms(master)
        self._worker_norms = [batch_norms(w.model) for w in pool.workers]
        for norms in self._worker_norms:
            for layer in norms:
                layer.defer_running_stats = True
        self._stats: list[list[list[tuple[Any, Any]]]] = []

    def compute(self, batch: Batch, step: int, timer: Timer) -> tuple[float, int, int]:
        """Forward and backward of this rank's micro-batches of ``batch`` (this rank's share
        of the global batch, ``local_chunks`` equal micro-batches), then the ordered sum;
        returns (loss sum, correct, count) over the local samples."""
        n = len(batch.sample_ids)
        if n % self.local_chunks:
            raise ValueError(f"OrderedChainGradients: a local batch of {n} samples is not {self.local_chunks} "
                             f"equal micro-batches")
        size = n // self.local_chunks
        with timer.phase("forward"):
            self.precision.prepare()  # the master parameters into the compute model, once per step
        totals = [0.0, 0, 0]
        workers = len(self.pool)
        for first in range(0, self.local_chunks, workers):
            js = range(first, min(self.local_chunks, first + workers))
            tasks = [partial(_micro_batch, batch, slice(j * size, (j + 1) * size), step) for j in js]
            for result in self.pool.run(tasks, timer):
                totals = [t + r for t, r in zip(totals, result)]
            with timer.phase("comm"):
                for worker, j in zip(self.pool.workers, js):
                    self._take(worker, j)
        with timer.phase("comm"):
            self._finish()
        return totals[0], totals[1], totals[2]

    def close(self) -> None:
        self.pool.close()

    def _take(self, worker: ComputeWorker, j: int) -> None:
        """Take local micro-batch ``j``'s gradient (in ``worker.flat.grads``) and statistics."""
        grads = worker.flat.grads
        if self.comm.rank:
            self.precision.unscale_into(grads, self._held[j])
        elif self._unscaled is not None:
            self.precision.unscale_into(grads, self._unscaled)
            self._sum += self._unscaled
        else:
            self._sum += grads
        norms = self._worker_norms[self.pool.workers.index(worker)]
        self._stats.append([layer.take_running_stats() for layer in norms])

    def _finish(self) -> None:
        """Chain the running sum through the ranks, leave the mean in ``flat.grads``, and
        apply every micro-batch's BatchNorm statistics in the global order."""
        comm, rank, size = self.comm, self.comm.rank, self.comm.size
        with comm.watchdog.watch("deterministic gradient chain"):
            if rank > 0:
                comm.recv(self._sum, rank - 1)
                for g in self._held:
                    self._sum += g
            if rank < size - 1:
                comm.send(self._sum, rank + 1)
            if size > 1:
                comm.broadcast(self._sum, root=size - 1)
        xp = get_array_module(self._sum)
        xp.multiply(self._sum, 1.0 / self.chunks, out=self.flat.grads)
        self._sum[...] = 0
        stats, self._stats = self._stats, []
        if self._master_norms:
            self._apply_running_stats(stats)

    def _apply_running_stats(self, local: list[list[list[tuple[Any, Any]]]]) -> None:
        if self.comm.size > 1:
            host = [[[(to_host(m), to_host(v)) for m, v in records] for records in norms] for norms in local]
            with self.comm.watchdog.watch("deterministic BatchNorm statistics all-gather"):
                gathered = self.comm.allgather_object(host)
            local = [micro_batch for rank_stats in gathered for micro_batch in rank_stats]
        for norms in local:  # micro-batches in global order
            for layer, records in zip(self._master_norms, norms):
                xp = get_array_module(layer.buffers["running_mean"])
                for mean, var in records:
                    layer.apply_running_stats(xp.asarray(mean), xp.asarray(var))


def _micro_batch(batch: Batch, part: slice, step: int, worker: ComputeWorker,
                 timer: Timer) -> tuple[float, int, int]:
    return worker.forward_backward(batch.x[part], batch.y[part], step, batch.sample_ids[part], timer)

