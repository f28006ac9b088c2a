"""NCCL communicator on GPU buffers (one rank per GPU): collectives and the bucketed reducer.

Run with as many ranks as GPUs (one rank also works: it exercises the streams and events).
"""
from __future__ import annotations

import cupy
import numpy as np
from toy import expected_mean, set_step, toy_model

from dtrain.comm import make_communicator
from dtrain.comm.watchdog import install_abort_on_exception
from dtrain.nn.flat import FlatParameters
from dtrain.parallel.gradients import AllReduceGradients, OverlappedAllReduceGradients
from dtrain.parallel.sync import broadcast_parameters, check_consistency
from dtrain.parallel.workers import ComputeWorker
from dtrain.precision import FullPrecision

comm = make_communicator("auto", "gpu", timeout_s=60)
install_abort_on_exception(comm)
rank, size = comm.rank, comm.size
assert comm.name == "nccl" and cupy.cuda.Device().id == comm.device_id
triangle = size * (size - 1) / 2

for dtype in (cupy.float16, cupy.float32, cupy.float64, cupy.int32, cupy.int64):
    buf = cupy.arange(1000, dtype=dtype) % 50 + rank
    comm.allreduce(buf, "sum")
    np.testing.assert_array_equal(cupy.asnumpy(buf), (np.arange(1000) % 50) * size + triangle)
buf = cupy.full(4097, 2.0 * rank, dtype=cupy.float32)
comm.allreduce(buf, "mean")
np.testing.assert_array_equal(cupy.asnumpy(buf), np.float32(2.0 * triangle / size))

# iallreduce of views, queued after work on the current stream that fills them
big = cupy.zeros(1 << 20, dtype=cupy.float32)
big += rank + 1  # on the current stream; the reduction must see it
first = comm.iallreduce(big[: 1 << 19], "sum")
big[(1 << 19) + 1000:] *= 3  # compute stream keeps working on the rest meanwhile
second = comm.iallreduce(big[(1 << 19): (1 << 19) + 1000], "mean")
first.wait()
second.wait()
host = cupy.asnumpy(big)
np.testing.assert_array_equal(host[: 1 << 19], triangle + size)
np.testing.assert_array_equal(host[(1 << 19): (1 << 19) + 1000], np.float32((triangle + size) / size))
np.testing.assert_array_equal(host[(1 << 19) + 1000:], 3 * (rank + 1))

for root in range(size):
    buf = cupy.arange(300, dtype=cupy.float64) * (rank + 1)
    comm.broadcast(buf[100:], root=root)
    np.testing.assert_array_equal(cupy.asnumpy(buf[100:]), np.arange(100, 300) * (root + 1))

for bad, kind in ((np.zeros(4, dtype=np.float32), TypeError), (cupy.zeros(10)[::2], ValueError)):
    try:
        comm.allreduce(bad)
    except kind as exc:
        assert "nccl allreduce" in str(exc), exc
    else:
        raise AssertionError(f"accepted {bad!r}")

for overlap in (True, False):
    model = toy_model(rank).to(cupy)
    flat = FlatParameters(model)
    broadcast_parameters(comm, model)
    check_consistency(comm, flat, 0)
    cls = OverlappedAllReduceGradients if overlap else AllReduceGradients
    averaging = cls(ComputeWorker(model, flat, FullPrecision(model, flat)), flat, comm, 40_000)
    if overlap:
        model.register_backward_hook(averaging.layer_done)
    for step in range(2):
        set_step(model, step)
        model.backward(cupy.zeros(1, dtype=cupy.float32))
        timings = averaging.reduce()
        np.testing.assert_allclose(cupy.asnumpy(flat.grads), expected_mean(model, flat, size, step),
                                   rtol=1e-6, atol=1e-7)
        assert len(timings) == len(averaging.buckets)

comm.barrier()
print(f"OK rank {rank}", flush=True)
