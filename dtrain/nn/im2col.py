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
* the input is read in batch-last (C, Hp, Wp, N) order (see :mod:`dtrain.nn.layout`):
  in place when it already is batch-last and unpadded, else through a copy into a
  zero-padded buffer. For one kernel offset (i, j) the block ``cols[:, i, j]`` is then a
  strided slice of that input whose contiguous runs are OW*N elements long (N for
  strides > 1). With the batch axis last these runs are long even for 6x6 feature maps,
  so im2col copies, and col2im accumulates, at close to memory bandwidth. An NCHW source
  would give runs of only OW elements and cost 2-3x more;
* the forward GEMM's (F, OH*OW*N) result is batch-last too, and is handed on as it is.

Both directions loop over the kh*kw kernel offsets; each step is one strided array copy
(or add) covering the whole batch and a block of channels (:mod:`dtrain.nn.blocks`).
On a GPU each direction is instead one CUDA kernel over the same layout
(:mod:`dtrain.nn.cuda_kernels`).
"""
from __future__ import annotations

from collections.abc import Iterator
from itertools import product
from typing import Any

from dtrain.backend import get_array_module, is_gpu_array
from dtrain.nn import cuda_kernels
from dtrain.nn.blocks import for_blocks
from dtrain.nn.layout import as_nchw, batch_last
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


def clipped_window(offset: int, count: int, stride: int, pad: int, size: int) -> tuple[slice, slice] | None:
    """For one kernel offset along one axis: (outputs, inputs) where the input lies inside the unpadded axis.

    Output ``o`` reads padded position ``o * stride + offset``, i.e. input ``o * stride +
    offset - pad``; the outputs whose input falls in ``0 .. size - 1`` are one slice, and
    so are their inputs. ``None`` when no output reads an input at this offset.
    """
    first = max(0, -((offset - pad) // stride))  # ceil((pad - offset) / stride)
    stop = min(count, (size - 1 + pad - offset) // stride + 1)
    if stop <= first:
        return None
    return slice(first, stop), window(first * stride + offset - pad, stop - first, stride)


def im2col(x: Array, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair, workspace: Workspace) -> Array:
    """Column matrix (C*kh*kw, OH*OW*N) of an (N, C, H, W) input (see the module docstring).

    The result is a workspace buffer: it stays valid until the next ``im2col`` with the
    same workspace. A batch-last input without padding is read in place; otherwise it is
    first copied into a zero-padded batch-last buffer, one block of channels at a time.
    """
    xp = get_array_module(x)
    n, c, h, w = x.shape
    (ph, pw), (oh, ow) = padding, out_hw
    cols = workspace.get("cols", (c * kernel[0] * kernel[1], oh * ow * n), x.dtype, xp)
    if is_gpu_array(x):
        return cuda_kernels.im2col(batch_last(x, workspace, "im2col_input"), kernel, stride, padding, out_hw, cols)
    source = x.transpose(1, 2, 3, 0)
    padded = source
    if padding != (0, 0) or not source.flags.c_contiguous:
        # Only the interior is ever written, so the zero border from allocation persists.
        padded = workspace.get("im2col_padded", (c, h + 2 * ph, w + 2 * pw, n), x.dtype, xp, fill=0)
    blocks = cols.reshape(c, kernel[0], kernel[1], oh, ow, n)

    def copy(start: int, stop: int) -> None:
        if padded is not source:
            padded[start:stop, ph:ph + h, pw:pw + w] = source[start:stop]
        for _, i, j in kernel_offsets(kernel):
            blocks[start:stop, i, j] = padded[start:stop, window(i, oh, stride[0]), window(j, ow, stride[1])]

    # Blocks sized by their padded input, which every kernel offset reads again.
    for_blocks(copy, c, padded[0].nbytes, x)
    return cols


def col2im(cols: Array, input_shape: Shape, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair) -> Array:
    """Adjoint of :func:`im2col`: sum the (C*kh*kw, OH*OW*N) columns into a new (N, C, H, W) array.

    The result is the (N, C, H, W) view of new batch-last memory. Each kernel offset adds
    only the columns whose input lies inside the unpadded image, so no padded buffer and
    no copy out of one are needed.
    """
    xp = get_array_module(cols)
    n, c, h, w = input_shape
    (ph, pw), (oh, ow) = padding, out_hw
    if is_gpu_array(cols):
        return as_nchw(cuda_kernels.col2im(cols, (c, h, w, n), kernel, stride, padding, out_hw))
    grad = xp.zeros((c, h, w, n), dtype=cols.dtype)
    blocks = cols.reshape(c, kernel[0], kernel[1], oh, ow, n)
    parts = []
    for _, i, j in kernel_offsets(kernel):
        rows = clipped_window(i, oh, stride[0], ph, h)
        columns = clipped_window(j, ow, stride[1], pw, w)
        if rows is not None and columns is not None:
            parts.append((i, j, rows, columns))

    def add(start: int, stop: int) -> None:
        for i, j, (out_rows, in_rows), (out_cols, in_cols) in parts:
            target = grad[start:stop, in_rows, in_cols]
            target += blocks[start:stop, i, j, out_rows, out_cols]

    # Blocks sized by their part of the result, which every kernel offset adds into again.
    for_blocks(add, c, grad[0].nbytes, cols)
    return as_nchw(grad)
