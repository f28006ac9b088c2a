"""Fake ``cupy.cuda.nccl``: NCCL collectives on fake device pointers, carried out over MPI.

One :class:`NcclCommunicator` per process, as dtrain uses NCCL: creating it is
collective over ``MPI.COMM_WORLD`` (it duplicates it, so its messages never mix with the
program's own MPI traffic), ``ndev`` must be the world size and ``rank`` the world rank.
All ranks must pass the same unique id: the fake checks it (an all-gather) and raises
``NcclError`` where real NCCL would hang. Two ranks on one physical GPU of a host are
refused like NCCL does ("Duplicate GPU detected"). The communicator belongs to the device
current at its creation, as in NCCL; buffers must lie in live fake arrays of that device and
streams must belong to it.

Calls take raw pointers, like NCCL: the fake maps NumPy views onto them and runs the
MPI collective in place, before returning (NCCL would queue it on the stream).

Differences from NCCL: float16 has no MPI type, so float16 all-reduces go through
float32 copies and round once at the end (NCCL adds float16 values in float16 along its
ring; for two ranks both are the correctly rounded sum, for more ranks NCCL may round
several times). Sums of other types use MPI's arithmetic in MPI's order. Only the
calls dtrain makes exist (no groups, no reduce-scatter/all-gather, no ``NCCL_AVG``).
"""
from __future__ import annotations

import ctypes
import os
import socket

import numpy as np

from cupy.cuda import memory, runtime

available = True

NCCL_INT8, NCCL_UINT8, NCCL_INT32, NCCL_UINT32, NCCL_INT64, NCCL_UINT64 = 0, 1, 2, 3, 4, 5
NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 6, 7, 8
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN = 0, 1, 2, 3

_DTYPES = {
    NCCL_INT8: np.int8, NCCL_UINT8: np.uint8, NCCL_INT32: np.int32, NCCL_UINT32: np.uint32,
    NCCL_INT64: np.int64, NCCL_UINT64: np.uint64, NCCL_FLOAT16: np.float16, NCCL_FLOAT32: np.float32,
    NCCL_FLOAT64: np.float64,
}
_UNHANDLED_CUDA_ERROR, _INVALID_ARGUMENT, _INVALID_USAGE = 1, 4, 5
_ERRORS = {
    _UNHANDLED_CUDA_ERROR: ("NCCL_ERROR_UNHANDLED_CUDA_ERROR", "unhandled cuda error"),
    _INVALID_ARGUMENT: ("NCCL_ERROR_INVALID_ARGUMENT", "invalid argument"),
    _INVALID_USAGE: ("NCCL_ERROR_INVALID_USAGE", "invalid usage"),
}
_UNIQUE_ID_BYTES = 128


class NcclError(RuntimeError):
    """An NCCL error; ``status`` is the ``ncclResult_t`` number."""

    def __init__(self, status: int, detail: str = "") -> None:
        self.status = status
        name, message = _ERRORS[status]
        super().__init__(f"{name}: {message}" + (f" ({detail})" if detail else ""))


def get_unique_id() -> tuple[int, ...]:
    """A random NCCL unique id: 128 signed bytes, as CuPy returns it."""
    return tuple(int(b) for b in np.frombuffer(os.urandom(_UNIQUE_ID_BYTES), dtype=np.int8))


class NcclCommunicator:
    """A communicator of ``ndev`` ranks, this process being ``rank`` (see the module docstring)."""

    def __init__(self, ndev: int, commId: tuple[int, ...], rank: int) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self._comm = MPI.COMM_WORLD.Dup()
        self._device = runtime.getDevice()
        if ndev != self._comm.Get_size() or rank != self._comm.Get_rank():
            raise NcclError(_INVALID_ARGUMENT, f"ndev={ndev}, rank={rank} but MPI has rank {self._comm.Get_rank()} "
                                               f"of {self._comm.Get_size()}; the fake needs one rank per process")
        ids = self._comm.allgather(tuple(commId))
        if any(other != ids[0] for other in ids):
            raise NcclError(_INVALID_USAGE, "the ranks passed different unique ids (real NCCL would hang)")
        gpus = self._comm.allgather((socket.gethostname(), runtime._physical_id(self._device)))
        for later, gpu in enumerate(gpus):
            if gpu in gpus[:later]:
                raise NcclError(_INVALID_USAGE, f"Duplicate GPU detected : rank {later} and rank {gpus.index(gpu)} "
                                                f"both on CUDA device {gpu[1]} of {gpu[0]}")
        self._destroyed = False

    def rank_id(self) -> int:
        return self._comm.Get_rank()

    def size(self) -> int:
        return self._comm.Get_size()

    def device_id(self) -> int:
        return self._device

    def destroy(self) -> None:
        """Later calls fail with ``NCCL_ERROR_INVALID_USAGE``."""
        self._destroyed = True

    def _buffer(self, ptr: int, count: int, datatype: int, stream: int) -> np.ndarray:
        """A NumPy view of ``count`` elements of ``datatype`` at device pointer ``ptr``, after the checks."""
        if self._destroyed:
            raise NcclError(_INVALID_USAGE, "the communicator was destroyed")
        if datatype not in _DTYPES:
            raise NcclError(_INVALID_ARGUMENT, f"unknown datatype {datatype}")
        try:
            stream_device = runtime._stream_device(stream)
        except runtime.CUDARuntimeError:
            raise NcclError(_UNHANDLED_CUDA_ERROR, f"unknown stream 0x{stream:x}") from None
        if stream_device != self._device:
            raise NcclError(_UNHANDLED_CUDA_ERROR, f"the stream is on device {stream_device}, "
                                                   f"the communicator on device {self._device}")
        dtype = np.dtype(_DTYPES[datatype])
        nbytes = count * dtype.itemsize
        if count and not memory._is_device_memory(ptr, nbytes, self._device):
            raise NcclError(_INVALID_ARGUMENT, f"0x{ptr:x} .. +{nbytes} bytes is not memory of a live array "
                                               f"on device {self._device}")
        if not count:
            return np.empty(0, dtype)
        return np.ctypeslib.as_array((ctypes.c_char * nbytes).from_address(ptr)).view(dtype)

    def allReduce(self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int, stream: int) -> None:
        """``recvbuf = op`` over the ranks' ``sendbuf`` (in place when the pointers are equal)."""
        ops = {NCCL_SUM: self._mpi.SUM, NCCL_PROD: self._mpi.PROD, NCCL_MAX: self._mpi.MAX, NCCL_MIN: self._mpi.MIN}
        if op not in ops:
            raise NcclError(_INVALID_ARGUMENT, f"unsupported reduction op {op}")
        send = self._buffer(sendbuf, count, datatype, stream)
        recv = self._buffer(recvbuf, count, datatype, stream)
        if datatype == NCCL_FLOAT16:
            wide = send.astype(np.float32)
            self._comm.Allreduce(self._mpi.IN_PLACE, wide, op=ops[op])
            recv[...] = wide  # one rounding back to float16
        elif sendbuf == recvbuf:
            self._comm.Allreduce(self._mpi.IN_PLACE, recv, op=ops[op])
        else:
            self._comm.Allreduce(send, recv, op=ops[op])

    def bcast(self, buff: int, count: int, datatype: int, root: int, stream: int) -> None:
        self._comm.Bcast(self._buffer(buff, count, datatype, stream), root=self._rank(root, "root"))

    def send(self, sendbuf: int, count: int, datatype: int, peer: int, stream: int) -> None:
        self._comm.Send(self._buffer(sendbuf, count, datatype, stream), dest=self._rank(peer, "peer"))

    def recv(self, recvbuf: int, count: int, datatype: int, peer: int, stream: int) -> None:
        self._comm.Recv(self._buffer(recvbuf, count, datatype, stream), source=self._rank(peer, "peer"))

    def _rank(self, rank: int, what: str) -> int:
        if not 0 <= rank < self._comm.Get_size():
            raise NcclError(_INVALID_ARGUMENT, f"{what} {rank} is not a rank of {self._comm.Get_size()}")
        return rank

    def __repr__(self) -> str:
        return f"<fake NcclCommunicator rank {self.rank_id()} of {self.size()} (device {self._device})>"
