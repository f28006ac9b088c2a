"""Scratch arrays that a layer reuses from one step to the next.

Convolution and pooling need large temporaries (padded inputs, column matrices, GEMM
results). Allocating them every step costs page faults on the host and allocator
traffic on the device, so a layer keeps one :class:`Workspace` and asks it for a named
buffer each call; the buffer is only reallocated when the shape, dtype or array module
changes (for example the last, smaller batch of an epoch). One buffer is kept per name,
so an occasional odd shape does not pin extra memory.

Workspace buffers are overwritten by the next call: never return one to a caller.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

from dtrain.nn.module import Array, Shape


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
