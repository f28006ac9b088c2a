"""Communicators: the world of one in process, and MPI collectives under mpirun -n 2 / -n 3."""
from __future__ import annotations

import numpy as np
import pytest
from mpirun_helper import assert_ok, run_mpi

from dtrain.comm import make_communicator
from dtrain.comm.single import SingleCommunicator

LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


@pytest.fixture
def no_launcher(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


def test_auto_is_single_without_launcher(no_launcher):
    comm = make_communicator("auto", "cpu")
    assert isinstance(comm, SingleCommunicator)
    assert (comm.rank, comm.size, comm.local_rank) == (0, 1, 0)


def test_single_refuses_a_multi_process_launch(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="4 processes"):
        make_communicator("single", "cpu")


@pytest.mark.parametrize("backend, device, match", [
    ("gloo", "cpu", "backend must be one of"),
    ("auto", "auto", "resolve 'auto' first"),
    ("nccl", "cpu", "nccl needs device=gpu"),
    ("mpi", "gpu", "with device=gpu use backend=nccl"),
])
def test_bad_backend_or_device_is_named(backend, device, match):
    with pytest.raises(ValueError, match=match):
        make_communicator(backend, device)


@pytest.mark.parametrize("piece", [-1, 2.5, True])
def test_a_bad_mpi_piece_size_is_named_before_mpi_starts(piece):
    with pytest.raises(ValueError, match="piece_bytes .0: whole buffers. must be an int >= 0"):
        make_communicator("mpi", "cpu", mpi_piece_bytes=piece)


def test_single_collectives_are_identity_but_validate(no_launcher):
    comm = make_communicator("single", "cpu", timeout_s=5)
    buf = np.arange(10, dtype=np.float32)
    comm.allreduce(buf[2:7], "mean")
    handle = comm.iallreduce(buf, "sum")
    assert handle.test()
    handle.wait()
    comm.broadcast(buf)
    np.testing.assert_array_equal(buf, np.arange(10))
    assert comm.bcast_object({"a": 1}) == {"a": 1}
    assert comm.allgather_object(3) == [3]
    comm.barrier()
    with pytest.raises(ValueError, match="not contiguous"):
        comm.allreduce(buf[::2])
    with pytest.raises(ValueError, match="1-D"):
        comm.allreduce(buf.reshape(2, 5))
    with pytest.raises(ValueError, match="op must be one of"):
        comm.allreduce(buf, "max")
    with pytest.raises(TypeError, match="floating-point"):
        comm.allreduce(np.arange(4), "mean")
    with pytest.raises(ValueError, match="read-only"):
        ro = np.zeros(3)
        ro.flags.writeable = False
        comm.allreduce(ro)
    with pytest.raises(ValueError, match="root"):
        comm.broadcast(buf, root=1)
    with pytest.raises(TypeError, match="NumPy/CuPy array"):
        comm.allreduce([1.0, 2.0])


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_mpi_collectives(n):
    assert_ok(run_mpi("collectives.py", n), n)
