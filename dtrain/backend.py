"""The one place that decides the array module (NumPy on CPU, CuPy on GPU).

Layer code never asks which library it runs on: it calls :func:`get_array_module` on
its input (the Dezero pattern) and uses the returned module, whose API NumPy and CuPy
share. Moving arrays between host and device happens only through :func:`to_device`
and :func:`to_host`.
"""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np

DEFAULT_DTYPE = np.float32


@functools.lru_cache(maxsize=1)
def _cupy() -> ModuleType | None:
    """CuPy if it imports and sees at least one CUDA device, else None."""
    try:
        import cupy
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def gpu_available() -> bool:
    """True when CuPy imports and a CUDA device is visible."""
    return _cupy() is not None


def resolve_device(device: str) -> str:
    """Map ``auto|cpu|gpu`` to ``cpu`` or ``gpu``; ``gpu`` without CuPy/CUDA is an error."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be one of auto, cpu, gpu; got {device!r}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        raise RuntimeError(
            "device=gpu was requested but CuPy is not installed or sees no CUDA device; "
            "install the GPU extra (pip install 'dtrain[gpu]') or run with device=cpu"
        )
    return device


def xp_for(device: str) -> ModuleType:
    """The array module for a device name (``auto``, ``cpu`` or ``gpu``)."""
    return _cupy() if resolve_device(device) == "gpu" else np


def get_array_module(x: Any) -> ModuleType:
    """NumPy or CuPy, whichever owns ``x``."""
    cp = _cupy()
    if cp is not None:
        return cp.get_array_module(x)
    return np


def is_gpu_array(x: Any) -> bool:
    return get_array_module(x) is not np


def to_device(x: Any, xp: ModuleType, dtype: Any = None) -> Any:
    """Copy (or keep) ``x`` as an array of module ``xp``, optionally casting to ``dtype``."""
    if xp is np:
        x = to_host(x)
        return np.asarray(x, dtype=dtype) if dtype is not None else np.asarray(x)
    return xp.asarray(x, dtype=dtype)


def to_host(x: Any) -> np.ndarray:
    """A NumPy array with the contents of ``x`` (a device-to-host copy for CuPy arrays)."""
    if is_gpu_array(x):
        return x.get()
    return np.asarray(x)


def synchronize(xp: ModuleType) -> None:
    """Wait for queued device work (no-op on NumPy); use before reading host clocks."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
