"""MPI collectives on NumPy (host) buffers through mpi4py (3.1 or 4.x).

The job's processes come from ``mpirun``/``srun``; the communicator works on a
duplicate of ``COMM_WORLD`` so its traffic never matches messages of other MPI users in
the same process. ``iallreduce`` is ``MPI_Iallreduce``: Open MPI progresses it only
while some MPI call runs, so callers that want overlap poke it with ``Handle.test()``
(the overlapped all-reduce does so after every layer's backward).

All-reduces of large buffers go out in pieces of at most ``piece_bytes`` (default
8 MiB), one collective each: Open MPI switches to another algorithm for large messages,
which on shared memory is much slower than the one it uses for a few MiB (README's
performance section has the measurement, ``scripts/bench_allreduce.py`` repeats it).
"""
from __future__ import annotations

import os
from typing import Any, NoReturn

import numpy as np

from dtrain.backend import Array
from dtrain.checks import check_int
from dtrain.comm.base import Communicator, Handle, flush_std_streams


def _mpi_types(MPI: Any) -> dict[np.dtype, Any]:
    """NumPy dtype -> MPI datatype for the dtypes we reduce (explicit, never guessed)."""
    return {
        np.dtype(np.float32): MPI.FLOAT,
        np.dtype(np.float64): MPI.DOUBLE,
        np.dtype(np.int8): MPI.INT8_T,
        np.dtype(np.uint8): MPI.UINT8_T,
        np.dtype(np.int32): MPI.INT32_T,
        np.dtype(np.uint32): MPI.UINT32_T,
        np.dtype(np.int64): MPI.INT64_T,
        np.dtype(np.uint64): MPI.UINT64_T,
    }


DEFAULT_PIECE_BYTES = 8 * 2**20


class MpiHandle(Handle):
    """The ``MPI_Iallreduce`` of each piece of a buffer, in flight; ``wait`` completes them
    and applies the mean's division."""

    def __init__(self, MPI: Any, requests: list[Any], buf: np.ndarray, divisor: int | None) -> None:
        self._Request = MPI.Request
        self._requests = requests
        self._buf: np.ndarray | None = buf  # kept alive until the operation completes
        self._divisor = divisor

    def test(self) -> bool:
        if self._buf is None:
            return True
        if self._Request.Testall(self._requests):
            self._complete()
            return True
        return False

    def wait(self) -> None:
        if self._buf is not None:
            self._Request.Waitall(self._requests)
            self._complete()

    def _complete(self) -> None:
        if self._divisor is not None:
            self._buf /= self._divisor
        self._buf = None


class MpiCommunicator(Communicator):
    """Collectives over MPI on host (NumPy) arrays, one process per CPU worker.

    ``allreduce`` is the blocking ``MPI_Allreduce``; ``iallreduce`` the non-blocking one;
    both reduce a buffer in pieces of at most ``piece_bytes`` (0: whole).
    """

    name = "mpi"

    def __init__(self, timeout_s: float | None = None, piece_bytes: int = DEFAULT_PIECE_BYTES) -> None:
        check_int(piece_bytes, "MpiCommunicator: piece_bytes (0: whole buffers)", 0)
        from mpi4py import (
            MPI,  # initializes MPI: only once the arguments are known to be good
        )

        self.piece_bytes = piece_bytes

        self._MPI = MPI
        world = MPI.COMM_WORLD
        node = world.Split_type(MPI.COMM_TYPE_SHARED)
        local_size, local_rank = node.Get_size(), node.Get_rank()
        node.Free()
        self._comm = world.Dup()
        self._types = _mpi_types(MPI)
        super().__init__(rank=world.Get_rank(), size=world.Get_size(), local_rank=local_rank, local_size=local_size,
                         timeout_s=timeout_s)

    def _typed(self, buf: Array, what: str) -> list[Any]:
        """``[buf, MPI datatype]`` after checking that ``buf`` is a host array we can reduce."""
        if not isinstance(buf, np.ndarray):
            raise TypeError(
                f"mpi {what}: expected a NumPy array, got {type(buf).__module__}.{type(buf).__name__}; "
                f"GPU arrays need backend=nccl (or copy to host first)"
            )
        self.check_buffer(buf, what)
        mpi_type = self._types.get(buf.dtype)
        if mpi_type is None:
            supported = ", ".join(str(d) for d in self._types)
            raise TypeError(f"mpi {what}: dtype {buf.dtype} is not supported; use one of {supported}")
        return [buf, mpi_type]

    def _pieces(self, buf: np.ndarray) -> list[list[Any]]:
        """``[piece, MPI datatype]`` for consecutive pieces of ``buf`` of at most ``piece_bytes``."""
        mpi_type = self._types[buf.dtype]
        step = max(1, self.piece_bytes // buf.itemsize) if self.piece_bytes else max(1, buf.size)
        return [[buf[start:start + step], mpi_type] for start in range(0, buf.size, step)]

    def _iallreduce(self, buf: Array, op: str) -> Handle:
        self._typed(buf, "allreduce")
        self.check_op(op, buf)
        requests = [self._comm.Iallreduce(self._MPI.IN_PLACE, piece, op=self._MPI.SUM) for piece in self._pieces(buf)]
        return MpiHandle(self._MPI, requests, buf, self.size if op == "mean" else None)

    def _allreduce(self, buf: Array, op: str) -> None:
        self._typed(buf, "allreduce")
        self.check_op(op, buf)
        for piece in self._pieces(buf):
            self._comm.Allreduce(self._MPI.IN_PLACE, piece, op=self._MPI.SUM)
        if op == "mean":
            buf /= self.size

    def _broadcast(self, buf: Array, root: int) -> None:
        spec = self._typed(buf, "broadcast")
        self.check_root(root)
        self._comm.Bcast(spec, root=root)

    def _send(self, buf: Array, dest: int) -> None:
        spec = self._typed(buf, "send")
        self.check_root(dest)
        self._comm.Send(spec, dest=dest)

    def _recv(self, buf: Array, source: int) -> None:
        spec = self._typed(buf, "recv")
        self.check_root(source)
        self._comm.Recv(spec, source=source)

    def _bcast_object(self, obj: Any, root: int) -> Any:
        self.check_root(root)
        return self._comm.bcast(obj, root=root)

    def _allgather_object(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def _barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int = 1) -> NoReturn:
        flush_std_streams()
        self._MPI.COMM_WORLD.Abort(code)
        os._exit(code)  # MPI_Abort does not return; this only runs if the MPI library misbehaves
