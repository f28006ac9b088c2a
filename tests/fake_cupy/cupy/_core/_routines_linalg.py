"""Fake ``cupy._core._routines_linalg``: the GEMM compute-type setting, recorded and readable.

The fake's matrix products are NumPy's whatever the setting (no TF32 rounding is
emulated); tests read :func:`get_compute_type` to see what dtrain asked for. Without a
setting, float32 products report ``COMPUTE_TYPE_TF32`` when ``CUPY_TF32=1`` was set at the
first query, else ``COMPUTE_TYPE_DEFAULT``, like CuPy.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

COMPUTE_TYPE_TBD = 0
COMPUTE_TYPE_DEFAULT = 1
COMPUTE_TYPE_PEDANTIC = 2
COMPUTE_TYPE_FP16 = 3
COMPUTE_TYPE_FP32 = 4
COMPUTE_TYPE_FP64 = 5
COMPUTE_TYPE_BF16 = 6
COMPUTE_TYPE_TF32 = 7

compute_types: dict[np.dtype, int] = {}  # dtype -> compute type, once set or first queried


def set_compute_type(dtype: Any, compute_type: int) -> None:
    """Use ``compute_type`` for matrix products of ``dtype`` from now on."""
    if compute_type not in range(COMPUTE_TYPE_TF32 + 1):
        raise ValueError(f"invalid compute type: {compute_type}")
    compute_types[np.dtype(dtype)] = compute_type


def get_compute_type(dtype: Any) -> int:
    """The compute type of ``dtype``'s matrix products (decided on first query, as in CuPy)."""
    dtype = np.dtype(dtype)
    if dtype not in compute_types:
        tf32 = dtype == np.float32 and os.environ.get("CUPY_TF32", "0") != "0"
        compute_types[dtype] = COMPUTE_TYPE_TF32 if tf32 else COMPUTE_TYPE_DEFAULT
    return compute_types[dtype]
