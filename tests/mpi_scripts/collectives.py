"""Array and object collectives of the MPI communicator, checked against exact expectations."""
from __future__ import annotations

import numpy as np

from dtrain.comm import make_communicator
from dtrain.comm.watchdog import install_abort_on_exception

comm = make_communicator("auto", "cpu", timeout_s=30)
install_abort_on_exception(comm)
rank, size = comm.rank, comm.size
assert comm.name == "mpi" and size > 1, comm
assert 0 <= comm.local_rank < size
triangle = size * (size - 1) / 2  # sum of the ranks

# allreduce sum and mean, float32/float64/int64, small integers so the sums are exact
for dtype in (np.float32, np.float64, np.int64):
    buf = np.arange(1000, dtype=dtype) + rank
    comm.allreduce(buf, "sum")
    assert buf.dtype == dtype
    np.testing.assert_array_equal(buf, size * np.arange(1000) + triangle)
for dtype in (np.float32, np.float64):
    buf = np.full(513, 2.0 * rank, dtype=dtype)
    comm.allreduce(buf, "mean")
    np.testing.assert_array_equal(buf, np.full(513, 2.0 * triangle / size, dtype=dtype))

# iallreduce on two slices of one buffer at once; the rest of the buffer is untouched
big = np.full(10_000, float(rank + 1), dtype=np.float32)
first = comm.iallreduce(big[100:4100], "sum")
second = comm.iallreduce(big[5000:9000], "mean")
assert big[0] == rank + 1  # not reduced: outside both views
second.wait()
first.wait()
first.wait()  # idempotent
assert first.test() and second.test()
np.testing.assert_array_equal(big[100:4100], triangle + size)
np.testing.assert_array_equal(big[5000:9000], np.float32((triangle + size) / size))
for untouched in (big[:100], big[4100:5000], big[9000:]):
    np.testing.assert_array_equal(untouched, rank + 1)

# large buffers go out in pieces (here of 1000 bytes: 250 float32, the last one shorter),
# blocking and non-blocking alike; a world of pieces reduces exactly like a whole buffer
assert comm.piece_bytes == 8 * 2**20, comm.piece_bytes
comm.piece_bytes = 1000
for start in (comm.allreduce, lambda b, op: comm.iallreduce(b, op).wait()):
    buf = np.arange(1001, dtype=np.float32) * (rank + 1)
    start(buf, "sum")
    np.testing.assert_array_equal(buf, np.arange(1001, dtype=np.float32) * (triangle + size))
    handle_buf = np.full(777, float(rank), dtype=np.float64)
    start(handle_buf, "mean")
    np.testing.assert_array_equal(handle_buf, triangle / size)
pending = comm.iallreduce(np.ones(2000, dtype=np.float32), "sum")
while not pending.test():  # Testall over the pieces' requests
    pass
comm.piece_bytes = 0  # whole buffers
buf = np.ones(3000, dtype=np.int64)
comm.allreduce(buf, "sum")
np.testing.assert_array_equal(buf, size)
comm.piece_bytes = 8 * 2**20

# broadcast from the first and the last rank, into a view
for root in (0, size - 1):
    buf = np.full(1000, -1.0)
    buf[200:700] = np.arange(500) * (rank + 1)
    comm.broadcast(buf[200:700], root=root)
    np.testing.assert_array_equal(buf[200:700], np.arange(500) * (root + 1))
    np.testing.assert_array_equal(buf[:200], -1.0)

# object collectives
assert comm.bcast_object({"dir": f"from {rank}"}, root=size - 1) == {"dir": f"from {size - 1}"}
assert comm.allgather_object(("rank", rank)) == [("rank", r) for r in range(size)]

# argument errors are raised before any communication (same on every rank)
for bad, kind in ((np.zeros(10)[::2], ValueError), (np.zeros((2, 5)), ValueError),
                  (np.zeros(4, dtype=np.float16), TypeError), ([1.0, 2.0], TypeError)):
    try:
        comm.allreduce(bad)
    except kind as exc:
        assert "mpi allreduce" in str(exc), exc
    else:
        raise AssertionError(f"allreduce accepted {bad!r}")
try:
    comm.broadcast(np.zeros(3), root=size)
except ValueError as exc:
    assert "root" in str(exc)
else:
    raise AssertionError("broadcast accepted root=size")

comm.barrier()
print(f"OK rank {rank}", flush=True)
