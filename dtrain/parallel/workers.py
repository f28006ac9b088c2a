"""Compute workers: model replicas that run forward and backward passes side by side.

A :class:`ComputeWorker` runs the forward pass, the loss and the backward pass of one
batch on its model and leaves the gradient in its flat gradient buffer. Worker 0 is the
run's compute model itself; the others are replicas whose parameters are views of the
same parameter buffer (:class:`~dtrain.nn.flat.FlatParameters` ``share_params_with``)
and whose gradients, activations and workspaces are their own.

A :class:`WorkerPool` runs one task per worker at the same time, worker 0 on the
calling thread and the others on threads of their own, each with a one-thread BLAS.
That is what makes deterministic training independent of the thread count: every
micro-batch's GEMMs run the single-threaded kernel whichever worker takes it and
however many workers there are, and the cores are shared by giving each worker its own
micro-batch instead of splitting GEMMs across threads.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Protocol, TypeVar

from dtrain.checks import check_int
from dtrain.nn.flat import FlatParameters
from dtrain.nn.loss import SoftmaxCrossEntropy, accuracy_counts
from dtrain.nn.module import Array, Sequential
from dtrain.precision import PrecisionPolicy
from dtrain.threads import blas_threads

T = TypeVar("T")


class Timer(Protocol):
    """What workers need of :class:`dtrain.timeline.PhaseTimer`."""

    def phase(self, name: str) -> Any: ...


class _Untimed:
    """The timer of workers other than worker 0: their phases overlap worker 0's."""

    def phase(self, name: str) -> Any:
        return nullcontext()


UNTIMED = _Untimed()


class ComputeWorker:
    """Forward, loss and backward of a batch on ``model``, whose gradients live in ``flat``."""

    def __init__(self, model: Sequential, flat: FlatParameters, precision: PrecisionPolicy) -> None:
        self.model = model
        self.flat = flat
        self.precision = precision
        self.loss_fn = SoftmaxCrossEntropy()

    def forward_backward(self, x: Array, y: Array, step: int, sample_ids: Any, timer: Timer = UNTIMED,
                         sync_master: bool = False) -> tuple[float, int, int]:
        """Run the batch ``x`` (B, C, H, W) with labels ``y`` (B,) through forward and
        backward (the loss gradient multiplied by the precision's loss scale); the
        gradients are written into ``flat.grads``. ``step`` and the global ``sample_ids``
        (B,) key the dropout masks. Returns (loss sum, correct predictions, B).

        ``sync_master``: first bring the compute model's parameters up to date with the
        master's, and afterwards write the unscaled gradients into the master buffer (a
        whole batch on the compute model; the ordered chain does both itself)."""
        self.model.set_batch_context(step, sample_ids)
        with timer.phase("forward"):
            if sync_master:
                self.precision.prepare()
            logits = self.model.forward(self.precision.cast_input(x))
            loss = self.loss_fn.forward(logits, y)
        with timer.phase("backward"):  # overlapped all-reduce buckets start in here
            self.model.backward(self.loss_fn.backward(self.precision.loss_scale), input_grad=False)
            if sync_master:
                self.precision.grads_to_master()
        correct, count = accuracy_counts(logits, y)
        return float(loss) * count, correct, count


class WorkerPool:
    """``count`` compute workers over ``precision``'s compute model: worker 0 is that model,
    the others replicas made by ``build_replica()`` (a new model of the same
    architecture, dtype and array module, in training mode) that share its parameters."""

    def __init__(self, precision: PrecisionPolicy, build_replica: Callable[[], Sequential], count: int) -> None:
        check_int(count, "WorkerPool: count", 1)
        self.workers = [ComputeWorker(precision.model, precision.flat, precision)]
        for _ in range(count - 1):
            replica = build_replica()
            flat = FlatParameters(replica, align=precision.flat.align, share_params_with=precision.flat)
            self.workers.append(ComputeWorker(replica, flat, precision))
        self._executor = (ThreadPoolExecutor(max_workers=count - 1, thread_name_prefix="dtrain-worker")
                          if count > 1 else None)

    def __len__(self) -> int:
        return len(self.workers)

    def run(self, tasks: Sequence[Callable[[ComputeWorker, Timer], T]], timer: Timer = UNTIMED) -> list[T]:
        """``[task_i(worker_i, timer_i)]``, all at once, each worker with a one-thread BLAS.

        Worker 0 runs on the calling thread with ``timer``; the others get an untimed
        timer. Once every task has ended, the first exception (in task order) is raised.
        """
        if not 1 <= len(tasks) <= len(self.workers):
            raise ValueError(f"WorkerPool.run: {len(tasks)} tasks for {len(self.workers)} workers")
        with blas_threads(1):
            futures = [self._executor.submit(task, worker, UNTIMED)
                       for task, worker in zip(tasks[1:], self.workers[1:])] if self._executor else []
            try:
                first = tasks[0](self.workers[0], timer)
            finally:
                for future in futures:
                    future.exception()  # wait for every worker before anything is raised
        return [first] + [future.result() for future in futures]

    def close(self) -> None:
        """Stop the worker threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
