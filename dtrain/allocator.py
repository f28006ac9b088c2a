"""Keeping freed memory for the next training step: glibc malloc's thresholds, set at start-up.

A training step allocates and frees the same large arrays every step: activations,
gradients and temporaries of up to tens of MB. glibc serves a request above its mmap
threshold (128 KiB, rising with freed blocks to at most 32 MiB) with fresh pages from the
kernel and unmaps them on ``free``, so every step pays a page fault and the kernel's
zeroing for each 4 KiB page of those arrays again (the README's Performance section has
the measured cost). With the mmap and trim thresholds at their maximum, freed blocks stay
in the heap and the next step reuses them; the process keeps the memory of its largest
step between steps instead of handing it back and forth.

PyTorch users get the same effect by preloading jemalloc or tcmalloc; this needs nothing
installed. On C libraries other than glibc (musl, macOS) the setting does not exist and
:func:`keep_freed_memory` says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h) and the largest value it takes (an int)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST = 2**31 - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap (blocks below 2 GiB); once per process.

    Returns whether the setting is in force: False where the C library is not glibc.
    """
    global _applied
    if _applied is None:
        _applied = _mallopt(M_MMAP_THRESHOLD, LARGEST) and _mallopt(M_TRIM_THRESHOLD, LARGEST)
    return _applied


def _mallopt(param: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (AttributeError, OSError, TypeError):  # not glibc: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(param, value) == 1
