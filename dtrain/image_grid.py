"""Tile a batch of images into one image (for TensorBoard), with [0, 1] normalization."""
from __future__ import annotations

import math
from typing import Literal

import numpy as np

from dtrain.checks import check_int

Normalize = Literal["each", "all", "none"]


def normalize_unit(images: np.ndarray, mode: Normalize) -> np.ndarray:
    """Min-max scale (N, C, H, W) images to [0, 1]: per image (``each``), jointly (``all``), or not.

    A constant image (or batch) maps to zeros rather than dividing by zero; ``none``
    only clips to [0, 1].
    """
    x = np.asarray(images, dtype=np.float64)
    if mode == "none":
        return np.clip(x, 0.0, 1.0)
    if mode not in ("each", "all"):
        raise ValueError(f"normalize must be 'each', 'all' or 'none', got {mode!r}")
    axes = tuple(range(1, x.ndim)) if mode == "each" else None
    lo = x.min(axis=axes, keepdims=True)
    span = x.max(axis=axes, keepdims=True) - lo
    return np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)


def make_grid(
    images: np.ndarray,
    nrow: int | None = None,
    padding: int = 2,
    pad_value: float = 1.0,
    normalize: Normalize = "all",
    scale: int = 1,
) -> np.ndarray:
    """One (C, H', W') float image in [0, 1] showing (N, C, H, W) ``images`` in a grid.

    ``nrow`` images per row (default ``ceil(sqrt(N))``), ``padding`` pixels of
    ``pad_value`` between and around tiles, each pixel repeated ``scale`` times in both
    directions (small filters stay visible). ``C`` must be 1 or 3.
    """
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[0] == 0 or x.shape[1] not in (1, 3):
        raise ValueError(f"make_grid expects a non-empty (N, C, H, W) batch with C in (1, 3), got shape {x.shape}")
    check_int(scale, "make_grid: scale", 1)
    x = normalize_unit(x, normalize)
    if scale > 1:
        x = x.repeat(scale, axis=2).repeat(scale, axis=3)
    n, c, h, w = x.shape
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(n))
    if ncol < 1:
        raise ValueError(f"make_grid: nrow must be >= 1, got {nrow!r}")
    nrows = math.ceil(n / ncol)
    grid = np.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value, dtype=np.float64)
    for i in range(n):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid
