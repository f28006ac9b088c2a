"""Fake ``cupy._util``: the warning CuPy gives for slow but valid usage."""
from __future__ import annotations


class PerformanceWarning(RuntimeWarning):
    """Valid but slow usage, e.g. an operation reading an array on another device (peer access)."""
