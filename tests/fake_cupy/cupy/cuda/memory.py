"""Fake device memory: which NumPy buffers are "device" allocations, on which device, and
the memory pool's figures.

Every NumPy buffer that a fake ``cupy.ndarray`` wraps is registered the first time it is
wrapped: views (whose base is registered) belong to that buffer's device; anything else is a new allocation on the calling
thread's current device. A registration ends when NumPy frees the buffer (a
``weakref.finalize`` on it).

The pool mimics CuPy's ``MemoryPool`` per device: allocations are rounded up to 512 bytes
(CuPy's allocation unit); a freed allocation stays cached in the pool (counted by
``total_bytes`` and ``free_bytes``) and is reused by the next allocation of the same
rounded size; ``free_all_blocks`` drops the cache. Figures are those of the current
device, like CuPy's. Unlike CuPy, NumPy temporaries inside an operation are not counted,
and cached blocks are only matched by exact size (CuPy also splits larger blocks).
"""
from __future__ import annotations

import threading
import weakref
from collections import Counter
from typing import NamedTuple

import numpy as np

from cupy.cuda import runtime

_UNIT = 512  # CuPy rounds every allocation up to this many bytes


class _Allocation(NamedTuple):
    ptr: int
    nbytes: int
    device: int


_lock = threading.RLock()  # reentrant: a finalizer may run inside a locked section (GC)
_allocations: dict[int, _Allocation] = {}  # id(owning NumPy array) -> its allocation
_used: Counter[int] = Counter()  # device -> bytes of live allocations (rounded)
_cached: dict[int, Counter[int]] = {}  # device -> {rounded size: cached free blocks}


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _rounded(nbytes: int) -> int:
    return -(-nbytes // _UNIT) * _UNIT


def _containing(ptr: int, nbytes: int) -> _Allocation | None:
    """The live allocation that holds bytes ``ptr .. ptr + nbytes - 1`` (at least one byte)."""
    for alloc in _allocations.values():
        if alloc.ptr <= ptr and ptr + max(nbytes, 1) <= alloc.ptr + alloc.nbytes:
            return alloc
    return None


def _release(key: int) -> None:
    with _lock:
        alloc = _allocations.pop(key)
        size = _rounded(alloc.nbytes)
        _used[alloc.device] -= size
        if size:
            _cached.setdefault(alloc.device, Counter())[size] += 1


def owner_of(a: np.ndarray) -> np.ndarray:
    """The array that owns ``a``'s memory, found through the ``.base`` links (NumPy's views,
    and objects such as ``as_strided``'s ``DummyArray`` between arrays)."""
    owner, link = a, a.base
    while link is not None:
        if isinstance(link, np.ndarray):
            owner = link
        link = getattr(link, "base", None)
    return owner


def device_of(a: np.ndarray) -> int:
    """The device whose memory ``a`` is (a view's device is its buffer's); a buffer not
    seen before becomes a new allocation on the current device."""
    owner = owner_of(a)
    with _lock:
        alloc = _allocations.get(id(owner))
        if alloc is not None:
            return alloc.device
        device = runtime.getDevice()
        size = _rounded(owner.nbytes)
        cached = _cached.get(device, Counter())
        if cached[size]:
            cached[size] -= 1
        _used[device] += size
        _allocations[id(owner)] = _Allocation(_address(owner), owner.nbytes, device)
    weakref.finalize(owner, _release, id(owner))
    return device


def _is_device_memory(ptr: int, nbytes: int, device: int) -> bool:
    """Whether ``ptr .. ptr + nbytes - 1`` lies in one live allocation on ``device``."""
    with _lock:
        alloc = _containing(ptr, nbytes)
    return alloc is not None and alloc.device == device


class MemoryPointer:
    """``ndarray.data``: the address of an array's first element and its device."""

    def __init__(self, ptr: int, device_id: int) -> None:
        self.ptr = ptr
        self.device_id = device_id

    @property
    def device(self):  # -> cupy.cuda.Device
        from cupy.cuda.device import Device

        return Device(self.device_id)

    def __repr__(self) -> str:
        return f"<MemoryPointer 0x{self.ptr:x} device={self.device_id}>"


class MemoryPool:
    """CuPy's default memory pool, as figures (see the module docstring)."""

    def used_bytes(self) -> int:
        """Bytes of the live allocations on the current device."""
        with _lock:
            return _used[runtime.getDevice()]

    def free_bytes(self) -> int:
        """Bytes cached in the pool (freed, not yet given back) on the current device."""
        with _lock:
            cached = _cached.get(runtime.getDevice(), Counter())
            return sum(size * count for size, count in cached.items())

    def total_bytes(self) -> int:
        """``used_bytes() + free_bytes()``: what the pool holds from the device."""
        return self.used_bytes() + self.free_bytes()

    def free_all_blocks(self, stream: object = None) -> None:
        """Give the current device's cached blocks back."""
        with _lock:
            _cached.pop(runtime.getDevice(), None)


_default_pool = MemoryPool()


def get_default_memory_pool() -> MemoryPool:
    return _default_pool
