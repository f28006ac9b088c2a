"""Sliding-window geometry, and the im2col column layout: a convolution as matrix products.

Column layout
-------------
For an input of shape (N, C, H, W), a kernel (kh, kw) and an output of (OH, OW) pixels,
the column matrix has shape (C*kh*kw, OH*OW*N)::

    cols[(c, i, j), (oh, ow, n)] = padded_x[n, c, oh*sh + i, ow*sw + j]

Why rows (c, i, j) and columns (oh, ow, n), batch fastest:

* rows in (c, i, j) order are the columns of ``weight.reshape(F, C*kh*kw)``, so forward
  is ``W @ cols`` and the weight gradient ``dY @ cols.T``; every GEMM operand is a
  contiguous matrix or its transpose, which BLAS takes without a copy;
* the input is read in batch-last (C, H, W, N) order (see :mod:`dtrain.nn.layout`): for one
  kernel offset and output pixel, the N samples are one contiguous run, so the kernels
  copy (im2col) and add back (col2im) whole runs;
* the forward GEMM's (F, OH*OW*N) result is batch-last too, and is handed on as it is.

Blocks of columns
-----------------
The whole column matrix is kh*kw times the input (25x for a 5x5 kernel: 207 MB for
AlexNet's conv2 at batch 128). :mod:`dtrain.nn.conv` never builds it: it works through
blocks of consecutive output pixels, each block's columns a contiguous (C*kh*kw, P*N)
matrix in a small buffer, filled by im2col just before its GEMM and still in cache when
the GEMM reads it. The block size comes from the kernel set (``COLUMN_BLOCK_BYTES`` in
:mod:`dtrain.nn.cpu_kernels` and :mod:`dtrain.nn.cuda_kernels`), never from the thread
count, so the arithmetic is the same however many threads run it.

Windows that tile the input
---------------------------
With stride = kernel the windows neither overlap nor leave gaps (but past the last whole
window): each input value appears at most once in the columns, which are the input in
another order (padding zeros added). Row r = (c, h, w) of the input's (C*H*W, N) view is
row ``rows[r]`` of the columns' (C*kh*kw*OH*OW, N) view (``rows`` from :func:`tiled_rows`), so a layer that
writes its output row by row can write it straight into the next convolution's columns
(see ``tiled_columns_pay`` in :mod:`dtrain.nn.cpu_kernels`).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dtrain.nn.module import Shape

Pair = tuple[int, int]


def sliding_output_hw(layer: Any, input_shape: Shape, kernel: Pair, stride: Pair, padding: Pair) -> Pair:
    """(OH, OW) of a window sliding over a per-sample (C, H, W) input; ``ValueError`` naming ``layer`` if impossible."""
    if len(input_shape) != 3:
        raise ValueError(f"{layer!r} expects a per-sample input shape (C, H, W), got {tuple(input_shape)}")
    _, h, w = input_shape
    if h < 1 or w < 1:
        raise ValueError(f"{layer!r} got input shape {tuple(input_shape)} with a non-positive spatial size")
    padded = (h + 2 * padding[0], w + 2 * padding[1])
    if kernel[0] > padded[0] or kernel[1] > padded[1]:
        raise ValueError(
            f"{layer!r}: kernel {kernel[0]}x{kernel[1]} is larger than the padded input "
            f"{padded[0]}x{padded[1]} (input shape {tuple(input_shape)}, padding {padding}); "
            f"use a smaller kernel, more padding or a larger input"
        )
    return ((padded[0] - kernel[0]) // stride[0] + 1, (padded[1] - kernel[1]) // stride[1] + 1)


def pixel_blocks(pixels: int, bytes_per_pixel: int, block_bytes: int) -> Iterator[tuple[int, int]]:
    """``(first, count)`` of consecutive blocks covering output pixels ``0 .. pixels-1``, each
    at most ``block_bytes`` of columns (at least one pixel), sizes as equal as possible."""
    per_block = max(1, block_bytes // max(1, bytes_per_pixel))
    blocks = -(-pixels // per_block)
    for b in range(blocks):
        first, stop = pixels * b // blocks, pixels * (b + 1) // blocks
        yield first, stop - first


def tiled_rows(input_chw: Shape, kernel: Pair, padding: Pair, out_hw: Pair) -> np.ndarray:
    """(C*H*W,) int64: for each row (c, h, w) of a (C, H, W, N) input's (C*H*W, N) view, the
    row of the (C*kh*kw*OH*OW, N) view of its columns that holds it, when the windows tile
    the input (stride = kernel); -1 for inputs below and right of the last whole window."""
    c, h, w = input_chw
    (kh, kw), (ph, pw), (oh, ow) = kernel, padding, out_hw
    hs, ws = np.arange(h) + ph, np.arange(w) + pw  # positions in the padded input
    tile_h, tile_w = hs // kh, ws // kw
    offset = (hs % kh)[:, None] * kw + (ws % kw)[None, :]  # (i, j) as i*kw + j
    pixel = tile_h[:, None] * ow + tile_w[None, :]
    rows = (np.arange(c)[:, None, None] * (kh * kw) + offset) * (oh * ow) + pixel
    inside = (tile_h < oh)[:, None] & (tile_w < ow)[None, :]
    return np.where(inside, rows, -1).reshape(-1).astype(np.int64)
