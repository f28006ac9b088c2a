"""The interface every communication backend implements (one class per strategy).

A :class:`Communicator` connects the ``size`` processes of a data-parallel job, one per
GPU or CPU worker. Array collectives work *in place* on a 1-D contiguous array, or a
contiguous slice of one (``flat.grads[a:b]``), so reducing a gradient bucket needs no
packing copy. Object collectives (pickled Python values) always go over the host.

Every collective is called by every rank in the same order; a rank that skips one makes
the others wait, which :mod:`dtrain.comm.watchdog` turns into an abort after ``timeout_s``
that names the collective, the step and the ranks that have not arrived. The public
collectives of the base class run the backend's under that watchdog, so no caller can
forget it.
"""
from __future__ import annotations

import abc
import sys
from typing import Any, NoReturn

from dtrain.backend import Array
from dtrain.checks import check_int
from dtrain.comm.watchdog import CollectiveWatchdog

OPS = ("sum", "mean")


class Handle(abc.ABC):
    """A collective started by :meth:`Communicator.iallreduce`; its buffer is not to be
    touched until :meth:`wait` returns."""

    @abc.abstractmethod
    def test(self) -> bool:
        """Drive the operation forward without blocking; True once it is complete."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Block until the result is in the buffer (idempotent)."""


class DoneHandle(Handle):
    """A handle for an operation that completed when it was started."""

    def test(self) -> bool:
        return True

    def wait(self) -> None:
        return None


class _WatchedHandle(Handle):
    """A started collective whose wait runs under the watchdog."""

    def __init__(self, handle: Handle, watchdog: CollectiveWatchdog) -> None:
        self._handle, self._watchdog = handle, watchdog

    def test(self) -> bool:
        return self._handle.test()

    def wait(self) -> None:
        with self._watchdog.watch("all-reduce (non-blocking)"):
            self._handle.wait()


class Communicator(abc.ABC):
    """Collectives among ``size`` ranks; this process is ``rank``, and ``local_rank`` of the
    ``local_size`` ranks on its node.

    ``timeout_s`` (None: wait forever) bounds every collective; one that takes longer
    aborts the whole job with a message (:class:`~dtrain.comm.watchdog.CollectiveWatchdog`).
    """

    name: str = "abstract"

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int,
                 timeout_s: float | None = None) -> None:
        self.rank = rank
        self.size = size
        self.local_rank = local_rank
        self.local_size = local_size
        self.timeout_s = timeout_s
        self.watchdog = CollectiveWatchdog(self, timeout_s)

    # -- collectives: every one runs under the watchdog -------------------------------
    def allreduce(self, buf: Array, op: str = "sum") -> None:
        """Replace ``buf`` (1-D contiguous) by its elementwise sum (or mean) over ranks."""
        with self.watchdog.watch("all-reduce"):
            self._allreduce(buf, op)

    def iallreduce(self, buf: Array, op: str = "sum") -> Handle:
        """Start :meth:`allreduce` of ``buf`` and return at once; the result is there after ``wait()``."""
        return _WatchedHandle(self._iallreduce(buf, op), self.watchdog)

    def broadcast(self, buf: Array, root: int = 0) -> None:
        """Overwrite ``buf`` (1-D contiguous) on every rank with the contents on rank ``root``."""
        with self.watchdog.watch("broadcast"):
            self._broadcast(buf, root)

    def send(self, buf: Array, dest: int) -> None:
        """Send ``buf`` (1-D contiguous) to rank ``dest``; returns once ``buf`` may be reused."""
        with self.watchdog.watch(f"send to rank {dest}"):
            self._send(buf, dest)

    def recv(self, buf: Array, source: int) -> None:
        """Fill ``buf`` (1-D contiguous) with what rank ``source`` sends."""
        with self.watchdog.watch(f"receive from rank {source}"):
            self._recv(buf, source)

    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        """``obj`` from rank ``root``, returned on every rank (picklable values only)."""
        with self.watchdog.watch("object broadcast"):
            return self._bcast_object(obj, root)

    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, as a list indexed by rank."""
        with self.watchdog.watch("object all-gather"):
            return self._allgather_object(obj)

    def barrier(self) -> None:
        """Return once every rank has called ``barrier``."""
        with self.watchdog.watch("barrier"):
            self._barrier()

    # -- what a backend implements -------------------------------------------------------
    def _allreduce(self, buf: Array, op: str) -> None:
        self._iallreduce(buf, op).wait()

    @abc.abstractmethod
    def _iallreduce(self, buf: Array, op: str) -> Handle: ...

    @abc.abstractmethod
    def _broadcast(self, buf: Array, root: int) -> None: ...

    @abc.abstractmethod
    def _send(self, buf: Array, dest: int) -> None: ...

    @abc.abstractmethod
    def _recv(self, buf: Array, source: int) -> None: ...

    @abc.abstractmethod
    def _bcast_object(self, obj: Any, root: int) -> Any: ...

    @abc.abstractmethod
    def _allgather_object(self, obj: Any) -> list[Any]: ...

    @abc.abstractmethod
    def _barrier(self) -> None: ...

    @abc.abstractmethod
    def abort(self, code: int = 1) -> NoReturn:
        """End every process of the job with exit status ``code`` (MPI_Abort); never returns."""

    # -- shared checks -----------------------------------------------------------------
    def check_buffer(self, buf: Array, what: str) -> None:
        """Raise a clear error unless ``buf`` is a 1-D contiguous array (views allowed)."""
        ndim = getattr(buf, "ndim", None)
        if ndim is None or not hasattr(buf, "flags"):
            raise TypeError(f"{self.name} {what}: expected a NumPy/CuPy array, got {type(buf).__name__}")
        if ndim != 1:
            raise ValueError(
                f"{self.name} {what}: expected a 1-D array, got shape {tuple(buf.shape)}; "
                f"pass a slice of the flat buffer or arr.reshape(-1) of a contiguous array"
            )
        if not buf.flags.c_contiguous:
            raise ValueError(
                f"{self.name} {what}: the array is not contiguous (strides {buf.strides}); "
                f"reduce a step-1 slice of a contiguous buffer, never a strided view"
            )
        if not getattr(buf.flags, "writeable", True):  # CuPy arrays have no such flag: always writable
            raise ValueError(f"{self.name} {what}: the array is read-only; collectives work in place")

    def check_op(self, op: str, buf: Array) -> None:
        if op not in OPS:
            raise ValueError(f"{self.name} allreduce: op must be one of {', '.join(OPS)}; got {op!r}")
        if op == "mean" and buf.dtype.kind not in "fc":
            raise TypeError(
                f"{self.name} allreduce: op='mean' needs a floating-point array, got {buf.dtype}; "
                f"use op='sum' and divide yourself"
            )

    def check_root(self, root: int) -> None:
        check_int(root, f"{self.name}: root (a rank)", 0, self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"


def flush_std_streams() -> None:
    """Flush stdout/stderr so a message written just before an abort is not lost."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream must not prevent the abort
            pass
