"""Scratch arrays that a layer reuses from one step to the next.

Convolution and pooling need large temporaries (padded inputs, column matrices, GEMM
results). Allocating them every step costs page faults on the host and allocator
traffic on the device, so a layer keeps one :class:`Workspace` and asks it for a named
buffer each call; the buffer is only reallocated when the shape, dtype or array module
changes (for example the last, smaller batch of an epoch). One buffer is kept per name,
so an occasional odd shape does not pin extra memory.

Workspace buffers are overwritten by the next call: never return one to a caller.

Scratch that is used up within one call (the blocks of im2col columns) need not be kept
per layer: :func:`shared_scratch` hands every layer on a thread the same buffer. Layers
run one at a time on a thread (the compute workers of deterministic mode each run their
own replica on their own thread), so one buffer per thread, name, dtype and device is
enough, and the memory is that of the largest request instead of the sum over layers.
:func:`shared_ones` is the same idea for a read-only vector of ones (sums along an axis
taken as BLAS products).
"""
from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import numpy as np

from dtrain.backend import current_device
from dtrain.nn.module import Array, Shape

_per_thread = threading.local()


def shared_scratch(name: str, size: int, dtype: Any, xp: ModuleType) -> Array:
    """A C-contiguous 1-D array of ``size`` elements from this thread's shared buffer ``name``
    (for ``dtype`` on the current device), grown when a request is larger than any before.
    Valid until the next request of that name on this thread."""
    buffers = _per_thread.__dict__.setdefault("buffers", {})
    key = (name, np.dtype(dtype).str, xp.__name__, current_device(xp))
    buf = buffers.get(key)
    if buf is None or buf.size < size:
        buffers.pop(key, None)  # free the smaller one before allocating
        buf = buffers[key] = xp.empty(size, dtype=dtype)
    return buf[:size]


def shared_ones(size: int, dtype: Any, xp: ModuleType) -> Array:
    """A 1-D array of ``size`` ones (for ``dtype`` on the current device), shared by every
    caller on this thread: read it, never write it. Sums along an axis are products with
    it (BLAS GEMV)."""
    buffers = _per_thread.__dict__.setdefault("ones", {})
    key = (np.dtype(dtype).str, xp.__name__, current_device(xp))
    buf = buffers.get(key)
    if buf is None or buf.size < size:
        buffers.pop(key, None)
        buf = buffers[key] = xp.ones(size, dtype=dtype)
    return buf[:size]


class Workspace:
    """Named, reusable scratch arrays of one layer."""

    def __init__(self) -> None:
        self._buffers: dict[str, Array] = {}

    def get(self, name: str, shape: Shape, dtype: Any, xp: ModuleType, fill: float | None = None) -> Array:
        """The buffer ``name`` with this shape, dtype and module, allocated on first use.

        ``fill`` initializes a newly allocated buffer (e.g. the zero border of a padded
        input, which callers never overwrite); a reused buffer keeps its contents.
        """
        shape = tuple(int(d) for d in shape)
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or not isinstance(buf, xp.ndarray):
            buf = xp.empty(shape, dtype=dtype) if fill is None else xp.full(shape, fill, dtype=dtype)
            self._buffers[name] = buf
        return buf
