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
Array = Any  # numpy.ndarray or cupy.ndarray


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


def rank_gpus(local_rank: int, local_size: int, per_rank: int, visible: int) -> list[int]:
    """The GPUs (indices among the visible ones) of node-local rank ``local_rank`` of
    ``local_size``, ``per_rank`` of them: the one rule for mapping ranks to GPUs.

    When every rank sees all the node's GPUs (plain ``mpirun``), rank ``r`` takes
    ``r * per_rank .. r * per_rank + per_rank - 1``. When each rank sees only its own
    (``CUDA_VISIBLE_DEVICES`` set per rank, as Slurm's ``--gpus-per-task`` does), it takes
    ``0 .. per_rank - 1``. Any other count is an error naming the numbers.
    """
    if visible >= local_size * per_rank:
        return [local_rank * per_rank + i for i in range(per_rank)]
    if visible == per_rank:
        return list(range(per_rank))
    raise RuntimeError(
        f"{local_size} ranks on this node x {per_rank} GPUs per rank need {local_size * per_rank} GPUs, but "
        f"this rank sees {visible}; start fewer ranks (mpirun -n <GPUs / devices per rank>), lower "
        f"parallel.devices_per_rank, or give each rank its own {per_rank} GPU(s) with CUDA_VISIBLE_DEVICES"
    )


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


def current_device(xp: ModuleType) -> int | None:
    """Where new ``xp`` arrays are allocated: the current CUDA device's id, None for NumPy."""
    return None if xp is np else xp.cuda.Device().id


def to_device(x: Any, xp: ModuleType, dtype: Any = None) -> Any:
    """Copy (or keep) ``x`` as an array of module ``xp``, optionally casting to ``dtype``."""
    if xp is np:
        x = to_host(x)
        return np.asarray(x, dtype=dtype) if dtype is not None else np.asarray(x)
    return xp.asarray(x, dtype=dtype)


def to_host(x: Any, copy: bool = False) -> np.ndarray:
    """A NumPy array with the contents of ``x``: a device-to-host copy for CuPy arrays;
    NumPy data itself unless ``copy``."""
    if is_gpu_array(x):
        return x.get()
    return np.array(x, copy=True) if copy else np.asarray(x)


def synchronize(xp: ModuleType) -> None:
    """Wait for queued device work (no-op on NumPy); use before reading host clocks."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
