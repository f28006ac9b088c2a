"""A world of one process: every collective is the identity (no MPI needed)."""
from __future__ import annotations

import os
from typing import Any, NoReturn

from dtrain.backend import Array
from dtrain.comm.base import Communicator, DoneHandle, Handle, flush_std_streams


class SingleCommunicator(Communicator):
    """Rank 0 of 1. Collectives only validate their arguments, so code that is wrong for
    N ranks (a 2-D buffer, a strided view) fails here too, not first on a cluster."""

    name = "single"

    def __init__(self, timeout_s: float | None = None) -> None:
        super().__init__(rank=0, size=1, local_rank=0, local_size=1, timeout_s=timeout_s)

    def _iallreduce(self, buf: Array, op: str) -> Handle:
        self.check_buffer(buf, "allreduce")
        self.check_op(op, buf)
        return DoneHandle()

    def _broadcast(self, buf: Array, root: int) -> None:
        self.check_buffer(buf, "broadcast")
        self.check_root(root)

    def _send(self, buf: Array, dest: int) -> None:
        raise ValueError(f"send to rank {dest}: a world of one process has no other rank")

    def _recv(self, buf: Array, source: int) -> None:
        raise ValueError(f"recv from rank {source}: a world of one process has no other rank")

    def _bcast_object(self, obj: Any, root: int) -> Any:
        self.check_root(root)
        return obj

    def _allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def _barrier(self) -> None:
        return None

    def abort(self, code: int = 1) -> NoReturn:
        flush_std_streams()
        os._exit(code)
