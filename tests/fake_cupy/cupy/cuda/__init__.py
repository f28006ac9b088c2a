"""Fake ``cupy.cuda``: devices, streams, events, the runtime and NCCL (see each module).

``cupy.cuda.nccl`` is a submodule to import (``from cupy.cuda import nccl``), as in CuPy;
it needs mpi4py only when a communicator is created.
"""
from __future__ import annotations

from cupy.cuda import compiler, memory, runtime
from cupy.cuda.device import Device
from cupy.cuda.memory import MemoryPointer, MemoryPool
from cupy.cuda.stream import Event, Stream, get_current_stream, get_elapsed_time

__all__ = ["Device", "Event", "MemoryPointer", "MemoryPool", "Stream", "compiler", "get_current_stream",
           "get_elapsed_time", "is_available", "memory", "runtime"]


def is_available() -> bool:
    """Whether a fake GPU is visible."""
    try:
        return runtime.getDeviceCount() > 0
    except runtime.CUDARuntimeError:
        return False
