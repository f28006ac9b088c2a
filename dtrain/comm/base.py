"""The interface every communication backend implements (one class per strategy).

A :class:`Communicator` connects the ``size`` processes of a data-parallel job, one per
GPU or CPU worker. Array collectives work *in place* on a 1-D contiguous array, or a
contiguous slice of one (``flat.grads[a:b]``), so reducing a gradient bucket needs no
packing copy. Object collectives (pickled Python values) always go over the host.

Every collective is called by every rank in the same order; a rank that skips one makes
the others wait, which :mod:`dtrain.comm.watchdog` turns into an abort after ``timeout_s``.
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


class Communicator(abc.ABC):
    """Collectives among ``size`` ranks; this process is ``rank``, and ``local_rank`` of the
    ``local_size`` ranks on its node.

    ``timeout_s`` (None: wait forever) bounds :meth:`barrier` and the gradient all-reduce's
    wait; a collective that takes longer aborts the whole job with a message.
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

    # -- array collectives -------------------------------------------------------------
    def allreduce(self, buf: Array, op: str = "sum") -> None:
        """Replace ``buf`` (1-D contiguous) by its elementwise sum (or mean) over ranks."""
        self.iallreduce(buf, op).wait()

    @abc.abstractmethod
    def iallreduce(self, buf: Array, op: str = "sum") -> Handle:
        """Start :meth:`allreduce` of ``buf`` and return at once; the result is there after ``wait()``."""

    @abc.abstractmethod
    def broadcast(self, buf: Array, root: int = 0) -> None:
        """Overwrite ``buf`` (1-D contiguous) on every rank with the contents on rank ``root``."""

    # -- point to point ---------------------------------------------------------------
    @abc.abstractmethod
    def send(self, buf: Array, dest: int) -> None:
        """Send ``buf`` (1-D contiguous) to rank ``dest``; returns once ``buf`` may be reused."""

    @abc.abstractmethod
    def recv(self, buf: Array, source: int) -> None:
        """Fill ``buf`` (1-D contiguous) with what rank ``source`` sends."""

    # -- object collectives ------------------------------------------------------------
    @abc.abstractmethod
    def bcast_object(self, obj: Any, root: int = 0) -> Any:
        """``obj`` from rank ``root``, returned on every rank (picklable values only)."""

    @abc.abstractmethod
    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, as a list indexed by rank."""

    # -- control -----------------------------------------------------------------------
    def barrier(self) -> None:
        """Return once every rank has called ``barrier`` (aborts the job after ``timeout_s``)."""
        with self.watchdog.watch("barrier"):
            self._barrier()

    @abc.abstractmethod
    def _barrier(self) -> None:
        """The backend's barrier, without a deadline."""

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
