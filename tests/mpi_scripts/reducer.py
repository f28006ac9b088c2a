"""The all-reduce strategies under MPI: overlapped buckets give the mean gradient, like blocking ones.

Checks, for several bucket sizes and both strategies, that ``flat.grads`` after
``reduce()`` is the mean over ranks of the known per-rank gradients, that overlapped
buckets start before backward returns, that the timing records are complete, and that
the result has the same bits run to run under random per-rank timing jitter (the sum's
order is the collective algorithm's, chosen by message size and rank count, not timing).
"""
from __future__ import annotations

import time

import numpy as np
from toy import expected_mean, set_step, toy_model

from dtrain.comm import make_communicator
from dtrain.comm.watchdog import install_abort_on_exception
from dtrain.nn.flat import FlatParameters
from dtrain.parallel.gradients import AllReduceGradients, OverlappedAllReduceGradients
from dtrain.parallel.workers import ComputeWorker
from dtrain.precision import FullPrecision

comm = make_communicator("mpi", "cpu", timeout_s=30)
install_abort_on_exception(comm)
rank, size = comm.rank, comm.size


def run(bucket_bytes: int, overlap: bool, steps: int = 3, jitter_s: float = 0.0, align: int = 1) -> list[np.ndarray]:
    model = toy_model(rank)
    flat = FlatParameters(model, align=align)
    worker = ComputeWorker(model, flat, FullPrecision(model, flat))
    cls = OverlappedAllReduceGradients if overlap else AllReduceGradients
    averaging = cls(worker, flat, comm, bucket_bytes)
    if overlap:
        model.register_backward_hook(averaging.layer_done)
    results = []
    for step in range(steps):
        set_step(model, step, jitter_s)
        model.backward(np.zeros(1, dtype=np.float32))
        backward_done = time.perf_counter()
        timings = averaging.reduce()
        got = flat.grads.copy()
        want = expected_mean(model, flat, size, step)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        if size == 2:  # (a + b) / 2 is one rounding whatever the algorithm: bitwise equal
            np.testing.assert_array_equal(got, want.astype(np.float32))
        assert sorted(t.bucket for t in timings) == list(range(len(averaging.buckets)))
        assert sum(t.nbytes for t in timings) == flat.grads.nbytes
        assert all(t.seconds >= 0 for t in timings)
        if overlap:  # every layer ran backward, so every bucket started inside it
            assert all(t.started < backward_done for t in timings), "a bucket started late"
        else:
            assert all(t.started >= backward_done for t in timings)
        results.append(got)
    return results


# bucket plans: one bucket, a few, one per parameter; alignment padding in the buffer
for bucket_bytes, align in ((25 * 2**20, 1), (40_000, 1), (1, 1), (40_000, 64)):
    for overlap in (True, False):
        run(bucket_bytes, overlap, align=align)

# identical bits whatever the timing of the ranks
for overlap in (True, False):
    first = run(40_000, overlap, jitter_s=0.004)
    second = run(40_000, overlap, jitter_s=0.0)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)

comm.barrier()
print(f"OK rank {rank}", flush=True)
