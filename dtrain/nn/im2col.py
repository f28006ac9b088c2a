"""Sliding-window geometry, and im2col / col2im: a convolution as one matrix product.

Column layout
-------------
For an input of shape (N, C, H, W), a kernel (kh, kw) and an output of (OH, OW) pixels,
the column matrix has shape (C*kh*kw, OH*OW*N)::

    cols[(c, i, j), (oh, ow, n)] = padded_x[n, c, oh*sh + i, ow*sw + j]

Why rows (c, i, j) and columns (oh, ow, n), batch fastest:

* rows in (c, i, j) order are the columns of ``weight.reshape(F, C*kh*kw)``, so forward
  is ``W @ cols`` and the weight gradient ``dY @ cols.T`` is written straight into
  ``grads["weight"]`` through a reshaped view; every GEMM operand is a contiguous matrix
  or its transpose, which BLAS takes without a copy;
* the input is first copied into a zero-padded (C, Hp, Wp, N) buffer. For one kernel
  offset (i, j) the block ``cols[:, i, j]`` is then a strided slice of that buffer whose
  contiguous runs are OW*N elements long (N for strides > 1). With the batch axis last
  these runs are long even for 6x6 feature maps, so im2col copies, and col2im
  accumulates into the contiguous padded buffer, at close to memory bandwidth. An NCHW
  source would give runs of only OW elements and cost 2-3x more;
* the price is a transposing copy of the input into the buffer and of results back to
  NCHW (:func:`batch_last_to_nchw`); these arrays are a kernel-area times smaller than
  the column matrix.

Both directions loop over the kh*kw kernel offsets only; each step is one strided array
copy (or add) covering the whole batch and all channels.
"""
from __future__ import annotations

from itertools import product
from typing import Any, Iterator

from dtrain.backend import get_array_module
from dtrain.nn.module import Array, Shape
from dtrain.nn.workspace import Workspace

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


def window(offset: int, count: int, stride: int) -> slice:
    """Positions ``offset, offset + stride, ...`` (``count`` of them) along one axis."""
    return slice(offset, offset + stride * (count - 1) + 1, stride)


def kernel_offsets(kernel: Pair) -> Iterator[tuple[int, int, int]]:
    """``(index, i, j)`` for every kernel offset in row-major scan order."""
    for index, (i, j) in enumerate(product(range(kernel[0]), range(kernel[1]))):
        yield index, i, j


def im2col(x: Array, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair, workspace: Workspace) -> Array:
    """Column matrix (C*kh*kw, OH*OW*N) of an (N, C, H, W) input (see the module docstring).

    The result is a workspace buffer: it stays valid until the next ``im2col`` with the
    same workspace.
    """
    xp = get_array_module(x)
    n, c, h, w = x.shape
    (ph, pw), (oh, ow) = padding, out_hw
    # Only the interior is ever written, so the zero border from allocation persists.
    padded = workspace.get("im2col_padded", (c, h + 2 * ph, w + 2 * pw, n), x.dtype, xp, fill=0)
    padded[:, ph:ph + h, pw:pw + w, :] = x.transpose(1, 2, 3, 0)
    cols = workspace.get("cols", (c * kernel[0] * kernel[1], oh * ow * n), x.dtype, xp)
    blocks = cols.reshape(c, kernel[0], kernel[1], oh, ow, n)
    for _, i, j in kernel_offsets(kernel):
        blocks[:, i, j] = padded[:, window(i, oh, stride[0]), window(j, ow, stride[1]), :]
    return cols


def col2im(cols: Array, input_shape: Shape, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair,
           workspace: Workspace) -> Array:
    """Adjoint of :func:`im2col`: sum the (C*kh*kw, OH*OW*N) columns back into a new (N, C, H, W) array."""
    xp = get_array_module(cols)
    n, c, h, w = input_shape
    (ph, pw), (oh, ow) = padding, out_hw
    padded = workspace.get("col2im_padded", (c, h + 2 * ph, w + 2 * pw, n), cols.dtype, xp)
    padded[...] = 0
    blocks = cols.reshape(c, kernel[0], kernel[1], oh, ow, n)
    for _, i, j in kernel_offsets(kernel):
        target = padded[:, window(i, oh, stride[0]), window(j, ow, stride[1]), :]
        target += blocks[:, i, j]
    return batch_last_to_nchw(padded[:, ph:ph + h, pw:pw + w, :], workspace, "col2im_staged")


def batch_last_to_nchw(a: Array, workspace: Workspace, staging: str) -> Array:
    """A new (N, C, H, W) array with the contents of a (C, H, W, N) one.

    Copied in two steps through the workspace buffer ``staging`` of shape (C, N, H, W):
    NumPy copies in destination order, and a direct copy reads one element per cache line
    across the whole source for every destination row; after splitting, each step reads
    from a few cache lines at a time, which made these copies 1.5-2.5x faster here.
    """
    xp = get_array_module(a)
    c, h, w, n = a.shape
    staged = workspace.get(staging, (c, n, h, w), a.dtype, xp)
    staged[...] = a.transpose(0, 3, 1, 2)
    return staged.transpose(1, 0, 2, 3).copy()  # copy(), not ascontiguousarray: never hand out the workspace
