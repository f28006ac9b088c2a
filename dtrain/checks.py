"""Argument checks for library constructors and functions: one helper per kind of value.

The app validates the whole configuration at start-up (:mod:`dtrain.config`); these
checks guard the library's own callers, who may pass anything. Each raises a
``ValueError`` whose message starts with ``what`` (e.g. ``"Conv2d: in_channels"``),
says what is allowed and repeats the value.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """An integer that is not a bool (Python or NumPy)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A finite int or float that is not a bool (Python or NumPy)."""
    return (is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


def check_int(value: Any, what: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int if it is one with ``low <= value < high`` (bounds optional)."""
    if not is_int(value) or (low is not None and value < low) or (high is not None and value >= high):
        if low is not None and high is not None:
            allowed = f"an int in [{low}, {high})"
        elif low is not None:
            allowed = f"an int >= {low}"
        elif high is not None:
            allowed = f"an int < {high}"
        else:
            allowed = "an int"
        raise ValueError(f"{what} must be {allowed}, got {value!r}")
    return int(value)


def check_real(value: Any, what: str, low: float = -math.inf, high: float = math.inf,
               low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float if it is a finite real number in the interval from ``low`` to
    ``high`` (closed ends unless ``low_open``/``high_open``)."""
    ok = is_real(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open or low == -math.inf else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
        raise ValueError(f"{what} must be a number in {interval}, got {value!r}")
    return float(value)


def check_bool(value: Any, what: str) -> bool:
    """``value`` if it is a bool (Python or NumPy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return bool(value)
