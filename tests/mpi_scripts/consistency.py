"""broadcast_parameters, check_consistency and the BatchNorm statistics reducer under MPI."""
from __future__ import annotations

import numpy as np
from toy import toy_model

from dtrain.comm import make_communicator
from dtrain.comm.watchdog import install_abort_on_exception
from dtrain.nn.flat import FlatParameters
from dtrain.parallel.sync import (
    RankDivergedError,
    broadcast_parameters,
    check_consistency,
    make_stats_reducer,
)

comm = make_communicator("mpi", "cpu", timeout_s=30)
install_abort_on_exception(comm)
rank, size = comm.rank, comm.size
last = size - 1


def expect_divergence(step: int, kind: str, ranks: list[int]) -> None:
    try:
        check_consistency(comm, flat, step)
    except RankDivergedError as exc:
        assert (exc.kind, exc.ranks, exc.step) == (kind, ranks, step), (exc.kind, exc.ranks, exc)
        assert f"step {step}" in str(exc) and str(ranks) in str(exc), exc
    else:
        raise AssertionError(f"check_consistency missed {kind} on ranks {ranks}")


model = toy_model(rank)  # different initial values on every rank
flat = FlatParameters(model)
expect_divergence(0, "diverged", list(range(1, size)))  # all differ: rank 0's group is the reference

broadcast_parameters(comm, model)
reference = toy_model(0)
for name, value in reference.state_dict().items():
    np.testing.assert_array_equal(model.state_dict()[name], value, err_msg=name)  # params and buffers
check_consistency(comm, flat, 1)

# one rank drifts by one ulp in one element
saved = flat.params[1234]
if rank == last:
    flat.params[1234] = np.nextafter(saved, np.float32(np.inf))
expect_divergence(2, "diverged", [last])
flat.params[1234] = saved
check_consistency(comm, flat, 3)

# one rank has a NaN
if rank == last:
    flat.params[7] = np.nan
expect_divergence(4, "nonfinite", [last])

# BatchNorm statistics: summed over ranks, in place, contiguous or not
reduce_stats = make_stats_reducer(comm)
stats = np.arange(12, dtype=np.float32) * (rank + 1)
out = reduce_stats(stats)
np.testing.assert_array_equal(out, np.arange(12) * size * (size + 1) / 2)
strided = (np.arange(24, dtype=np.float64) * (rank + 1))[::2]
np.testing.assert_array_equal(reduce_stats(strided), np.arange(0, 24, 2) * size * (size + 1) / 2)

comm.barrier()
print(f"OK rank {rank}", flush=True)
