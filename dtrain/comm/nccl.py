"""NCCL collectives on CuPy (GPU) buffers, one process per GPU.

Setup: MPI provides rank, size and the node-local rank (``COMM_TYPE_SHARED``); each
process selects its first GPU by :func:`dtrain.backend.rank_gpus` (all GPUs visible to
every rank, or each rank's own through ``CUDA_VISIBLE_DEVICES``), rank 0 creates the
NCCL unique id and MPI broadcasts it. Object collectives, the barrier and abort stay on MPI.

Overlap: a reduction runs on a dedicated non-blocking stream. It first waits (on the GPU,
via an event) for the work already queued on the caller's current stream, which is what
produced the gradients; the caller's stream keeps computing the next layers meanwhile.
``Handle.wait()`` blocks the host on a completion event, so the all-reduce's time
accounting and the collective watchdog see a stuck reduction.
"""
from __future__ import annotations

from typing import Any, NoReturn

import numpy as np

from dtrain.backend import Array, rank_gpus
from dtrain.comm.base import Communicator, Handle
from dtrain.comm.mpi import MpiCommunicator


def _nccl_types(nccl: Any) -> dict[np.dtype, int]:
    """NumPy dtype -> NCCL datatype enum."""
    return {
        np.dtype(np.float16): nccl.NCCL_FLOAT16,
        np.dtype(np.float32): nccl.NCCL_FLOAT32,
        np.dtype(np.float64): nccl.NCCL_FLOAT64,
        np.dtype(np.int8): nccl.NCCL_INT8,
        np.dtype(np.uint8): nccl.NCCL_UINT8,
        np.dtype(np.int32): nccl.NCCL_INT32,
        np.dtype(np.uint32): nccl.NCCL_UINT32,
        np.dtype(np.int64): nccl.NCCL_INT64,
        np.dtype(np.uint64): nccl.NCCL_UINT64,
    }


class NcclHandle(Handle):
    """A reduction queued on the communication stream; done when ``event`` has fired."""

    def __init__(self, event: Any, buf: Any) -> None:
        self._event = event
        self._buf = buf  # kept alive until the GPU is done with it

    def test(self) -> bool:
        if self._buf is not None and self._event.done:
            self._buf = None
        return self._buf is None

    def wait(self) -> None:
        if self._buf is not None:
            self._event.synchronize()
            self._buf = None


class NcclCommunicator(Communicator):
    """GPU collectives through ``cupy.cuda.nccl``; needs mpi4py for setup and object collectives.

    ``device_id`` is the GPU this process uses (made current by the constructor).
    """

    name = "nccl"

    def __init__(self, timeout_s: float | None = None, devices_per_rank: int = 1) -> None:
        import cupy
        from cupy.cuda import nccl

        if not nccl.available:
            raise RuntimeError(
                "backend=nccl: CuPy cannot load the NCCL library; install NCCL for your CUDA version "
                "(e.g. pip install nvidia-nccl-cu12) or use backend=mpi with device=cpu"
            )
        self._cupy = cupy
        self._nccl = nccl
        self._host = MpiCommunicator(timeout_s=None)
        super().__init__(rank=self._host.rank, size=self._host.size, local_rank=self._host.local_rank,
                         local_size=self._host.local_size,
                         timeout_s=timeout_s)
        visible = cupy.cuda.runtime.getDeviceCount()
        self.device_id = rank_gpus(self.local_rank, self._host.local_size, devices_per_rank, visible)[0]
        cupy.cuda.Device(self.device_id).use()
        with self.watchdog.watch("NCCL communicator setup"):
            unique_id = self._host.bcast_object(nccl.get_unique_id() if self.rank == 0 else None)
            self._comm = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._types = _nccl_types(nccl)

    def _device_buffer(self, buf: Array, what: str) -> int:
        """The NCCL datatype of ``buf`` after checking it is a reducible array on our GPU."""
        if not isinstance(buf, self._cupy.ndarray):
            raise TypeError(
                f"nccl {what}: expected a CuPy array, got {type(buf).__module__}.{type(buf).__name__}; "
                f"host arrays need backend=mpi"
            )
        self.check_buffer(buf, what)
        if buf.device.id != self.device_id:
            raise ValueError(f"nccl {what}: the array is on GPU {buf.device.id}, this rank uses GPU {self.device_id}")
        nccl_type = self._types.get(np.dtype(buf.dtype))
        if nccl_type is None:
            supported = ", ".join(str(d) for d in self._types)
            raise TypeError(f"nccl {what}: dtype {buf.dtype} is not supported; use one of {supported}")
        return nccl_type

    def _after_current_stream(self) -> None:
        """Make the communication stream wait for work queued so far on the caller's stream."""
        ready = self._cupy.cuda.Event(disable_timing=True)
        ready.record(self._cupy.cuda.get_current_stream())
        self._stream.wait_event(ready)

    def _completion(self, buf: Array) -> NcclHandle:
        done = self._cupy.cuda.Event(block=True, disable_timing=True)  # block: wait() sleeps, no spinning
        done.record(self._stream)
        return NcclHandle(done, buf)

    def _iallreduce(self, buf: Array, op: str) -> Handle:
        nccl_type = self._device_buffer(buf, "allreduce")
        self.check_op(op, buf)
        self._after_current_stream()
        ptr = buf.data.ptr
        self._comm.allReduce(ptr, ptr, buf.size, nccl_type, self._nccl.NCCL_SUM, self._stream.ptr)
        if op == "mean":
            with self._stream:
                buf /= self.size
        return self._completion(buf)

    def _broadcast(self, buf: Array, root: int) -> None:
        self._blocking("broadcast", buf, root, self._comm.bcast)

    def _send(self, buf: Array, dest: int) -> None:
        self._blocking("send", buf, dest, self._comm.send)

    def _recv(self, buf: Array, source: int) -> None:
        self._blocking("recv", buf, source, self._comm.recv)

    def _blocking(self, what: str, buf: Array, peer: int, nccl_call: Any) -> None:
        """Run ``nccl_call(ptr, count, dtype, peer, stream)`` (bcast/send/recv) on the
        communication stream after the caller's queued work, and wait for it."""
        nccl_type = self._device_buffer(buf, what)
        self.check_root(peer)
        self._after_current_stream()
        nccl_call(buf.data.ptr, buf.size, nccl_type, peer, self._stream.ptr)
        self._completion(buf).wait()

    def _bcast_object(self, obj: Any, root: int) -> Any:
        return self._host.bcast_object(obj, root)

    def _allgather_object(self, obj: Any) -> list[Any]:
        return self._host.allgather_object(obj)

    def _barrier(self) -> None:
        self._host._barrier()

    def abort(self, code: int = 1) -> NoReturn:
        self._host.abort(code)
