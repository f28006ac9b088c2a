"""2-D max and average pooling (PyTorch's ``nn.MaxPool2d`` / ``nn.AvgPool2d``, floor mode).

Both work on the batch-last (C, H, W, N) form of the input (see :mod:`dtrain.nn.layout`)
and return batch-last memory as (N, C, OH, OW) views. They loop over the kh*kw kernel
offsets only: for one offset, the inputs under it for every output pixel form one
strided slice of the (padded) input whose runs of N elements are contiguous, so each
step is one array operation. The loops run on blocks of channels small enough for the
chain of operations to stay in cache, spread over the thread budget
(:mod:`dtrain.nn.blocks`). Backward adds each offset's share of the output gradient into
a zeroed padded array through the same slices, which also sums correctly where windows
overlap (kernel 3, stride 2). On a GPU each pass is one CUDA kernel over the same layout
(:mod:`dtrain.nn.cuda_kernels`).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dtrain.backend import get_array_module, is_gpu_array
from dtrain.nn import cuda_kernels
from dtrain.nn.blocks import for_blocks
from dtrain.nn.checks import check_rank, pair
from dtrain.nn.im2col import kernel_offsets, sliding_output_hw, window
from dtrain.nn.layout import as_nchw, batch_last
from dtrain.nn.module import Array, Module, Shape
from dtrain.nn.workspace import Workspace


class _Pool2d(Module):
    """Window geometry, validation and the batch-last input and gradient arrays of the pooling layers."""

    pad_value: float = 0.0  # what the padded border holds in forward

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0) -> None:
        """``stride`` defaults to ``kernel_size``; ``padding`` may be at most half the kernel."""
        super().__init__()
        name = type(self).__name__
        self.kernel_size = pair(kernel_size, "kernel_size", name)
        self.stride = self.kernel_size if stride is None else pair(stride, "stride", name)
        self.padding = pair(padding, "padding", name)
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(
                f"{name}: kernel_size and stride must be positive, got kernel_size={kernel_size!r}, stride={stride!r}"
            )
        if min(self.padding) < 0 or any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(
                f"{name}: padding must be between 0 and half the kernel size, "
                f"got padding={padding!r} for kernel_size={kernel_size!r}"
            )
        self._workspace = Workspace()
        self._input_shape: Shape | None = None  # set by forward, cleared by backward

    def output_shape(self, input_shape: Shape) -> Shape:
        oh, ow = sliding_output_hw(self, input_shape, self.kernel_size, self.stride, self.padding)
        return (input_shape[0], oh, ow)

    def _padded_input(self, x: Array) -> Array:
        """(C, Hp, Wp, N): ``x`` batch-last inside a ``pad_value`` border (a workspace buffer, or ``x``'s memory)."""
        if self.padding == (0, 0):
            return batch_last(x, self._workspace, "input")
        xp = get_array_module(x)
        n, c, h, w = x.shape
        ph, pw = self.padding
        padded = self._workspace.get("padded", (c, h + 2 * ph, w + 2 * pw, n), x.dtype, xp, fill=self.pad_value)
        source = x.transpose(1, 2, 3, 0)

        def copy(start: int, stop: int) -> None:  # only the interior: the border keeps pad_value
            padded[start:stop, ph:ph + h, pw:pw + w] = source[start:stop]

        for_blocks(copy, c, 2 * padded[0].nbytes, x)
        return padded

    def _windows(self, padded: Array, out_hw: tuple[int, int]) -> Iterator[tuple[int, Array]]:
        """``(offset index, slice of padded)`` for each kernel offset: the (C, OH, OW, N) inputs under that offset."""
        for index, i, j in kernel_offsets(self.kernel_size):
            yield index, padded[:, window(i, out_hw[0], self.stride[0]), window(j, out_hw[1], self.stride[1])]

    def _start_forward(self, x: Array) -> tuple[int, int]:
        check_rank(self, x, 4, "N, C, H, W")
        _, oh, ow = self.output_shape(x.shape[1:])
        self._input_shape = tuple(x.shape)
        return oh, ow

    def _start_backward(self, grad_out: Array) -> tuple[Shape, Array]:
        """The forward's input shape and ``grad_out`` batch-last (C, OH, OW, N); validates ``grad_out``."""
        if self._input_shape is None:
            raise RuntimeError(f"{self!r}: backward needs a forward first (each forward supports one backward)")
        input_shape, self._input_shape = self._input_shape, None
        expected = (input_shape[0], *self.output_shape(input_shape[1:]))
        got = tuple(getattr(grad_out, "shape", ()))
        if got != expected:
            raise ValueError(f"{self!r}: grad_out has shape {got}, the forward output was {expected}")
        return input_shape, batch_last(grad_out, self._workspace, "grad_out")

    def _zeroed_grad(self, input_shape: Shape, like: Array) -> Array:
        """A new zeroed (C, Hp, Wp, N) input gradient for the CPU path to add into."""
        n, c, h, w = input_shape
        ph, pw = self.padding
        return get_array_module(like).zeros((c, h + 2 * ph, w + 2 * pw, n), dtype=like.dtype)

    @staticmethod
    def _chwn(input_shape: Shape) -> Shape:
        n, c, h, w = input_shape
        return (c, h, w, n)

    def _unpad(self, grad_in: Array, input_shape: Shape) -> Array:
        """The (N, C, H, W) view of the padded gradient's interior (the array is new: no copy needed)."""
        _, _, h, w = input_shape
        ph, pw = self.padding
        return as_nchw(grad_in[:, ph:ph + h, pw:pw + w])

    def extra_repr(self) -> str:
        def show(v: tuple[int, int]) -> Any:
            return v[0] if v[0] == v[1] else v

        return f"kernel_size={show(self.kernel_size)}, stride={show(self.stride)}, padding={show(self.padding)}"


class MaxPool2d(_Pool2d):
    """Maximum over each window of (N, C, H, W) -> (N, C, OH, OW); the border pads with -inf.

    Backward routes each output's gradient to exactly one input: the first maximum of
    its window in row-major scan order (PyTorch's choice on ties).
    """

    pad_value = -np.inf

    def _argmax(self, shape: Shape, xp: Any) -> Array:
        """Workspace buffer of the (C, OH, OW, N) offset index of each window's maximum, as forward left it.

        Its dtype is the smallest integer type that holds kh*kw - 1.
        """
        dtype = np.min_scalar_type(self.kernel_size[0] * self.kernel_size[1] - 1)
        return self._workspace.get("argmax", shape, dtype, xp)

    def forward(self, x: Array) -> Array:
        """(N, C, H, W) -> (N, C, OH, OW); remembers which kernel offset won each window."""
        out_hw = self._start_forward(x)
        xp = get_array_module(x)
        if is_gpu_array(x):
            source = batch_last(x, self._workspace, "input")
            argmax = self._argmax((source.shape[0], *out_hw, source.shape[3]), xp)
            best = cuda_kernels.max_pool_forward(source, self.kernel_size, self.stride, self.padding, out_hw, argmax)
            return as_nchw(best)
        padded = self._padded_input(x)
        c, n = padded.shape[0], padded.shape[3]
        shape = (c, *out_hw, n)
        best = xp.empty(shape, dtype=x.dtype)
        argmax = self._argmax(shape, xp)
        better = self._workspace.get("better", shape, bool, xp)
        marked = self._workspace.get("marked", shape, argmax.dtype, xp)

        def pool(start: int, stop: int) -> None:
            top, top_at, wins, mark = best[start:stop], argmax[start:stop], better[start:stop], marked[start:stop]
            windows = self._windows(padded[start:stop], out_hw)
            _, first = next(windows)
            top[...] = first
            top_at[...] = 0
            for index, values in windows:
                xp.greater(values, top, out=wins)  # strict: on ties the earlier offset keeps the win
                xp.maximum(top, values, out=top)
                # Offsets come in increasing order, so max() sets top_at to index exactly where wins
                # (a masked copy would do the same but is several times slower in NumPy).
                xp.multiply(wins, argmax.dtype.type(index), out=mark)
                xp.maximum(top_at, mark, out=top_at)

        for_blocks(pool, c, padded[0].nbytes + best[0].nbytes * 3, x)
        return as_nchw(best)

    def backward(self, grad_out: Array) -> Array:
        """(N, C, OH, OW) -> (N, C, H, W): each output's gradient goes to its window's argmax."""
        input_shape, grad = self._start_backward(grad_out)
        xp = get_array_module(grad_out)
        argmax = self._argmax(grad.shape, xp)
        if is_gpu_array(grad):
            return as_nchw(cuda_kernels.max_pool_backward(grad, argmax, self._chwn(input_shape), self.kernel_size,
                                                          self.stride, self.padding))
        grad_in = self._zeroed_grad(input_shape, grad)
        won = self._workspace.get("better", argmax.shape, bool, xp)
        share = self._workspace.get("share", argmax.shape, grad.dtype, xp)

        def route(start: int, stop: int) -> None:
            for index, target in self._windows(grad_in[start:stop], grad.shape[1:3]):
                xp.equal(argmax[start:stop], index, out=won[start:stop])
                xp.multiply(grad[start:stop], won[start:stop], out=share[start:stop])
                target += share[start:stop]

        for_blocks(route, grad.shape[0], grad_in[0].nbytes + grad[0].nbytes * 3, grad_out)
        return self._unpad(grad_in, input_shape)


class AvgPool2d(_Pool2d):
    """Mean over each window of (N, C, H, W) -> (N, C, OH, OW).

    Padded zeros count towards the mean (PyTorch's default ``count_include_pad=True``),
    so every window divides by kh*kw.
    """

    def forward(self, x: Array) -> Array:
        """(N, C, H, W) -> (N, C, OH, OW)."""
        out_hw = self._start_forward(x)
        xp = get_array_module(x)
        if is_gpu_array(x):
            source = batch_last(x, self._workspace, "input")
            return as_nchw(cuda_kernels.avg_pool_forward(source, self.kernel_size, self.stride, self.padding, out_hw))
        padded = self._padded_input(x)
        c, n = padded.shape[0], padded.shape[3]
        total = xp.empty((c, *out_hw, n), dtype=x.dtype)

        def pool(start: int, stop: int) -> None:
            part = total[start:stop]
            windows = self._windows(padded[start:stop], out_hw)
            _, first = next(windows)
            part[...] = first
            for _, values in windows:
                part += values
            part *= 1.0 / (self.kernel_size[0] * self.kernel_size[1])

        for_blocks(pool, c, padded[0].nbytes + total[0].nbytes, x)
        return as_nchw(total)

    def backward(self, grad_out: Array) -> Array:
        """(N, C, OH, OW) -> (N, C, H, W): each window input gets grad / (kh*kw)."""
        input_shape, grad = self._start_backward(grad_out)
        xp = get_array_module(grad_out)
        if is_gpu_array(grad):
            return as_nchw(cuda_kernels.avg_pool_backward(grad, self._chwn(input_shape), self.kernel_size,
                                                          self.stride, self.padding))
        grad_in = self._zeroed_grad(input_shape, grad)
        share = self._workspace.get("share", grad.shape, grad.dtype, xp)

        def spread(start: int, stop: int) -> None:
            xp.multiply(grad[start:stop], 1.0 / (self.kernel_size[0] * self.kernel_size[1]), out=share[start:stop])
            for _, target in self._windows(grad_in[start:stop], grad.shape[1:3]):
                target += share[start:stop]

        for_blocks(spread, grad.shape[0], grad_in[0].nbytes + grad[0].nbytes * 2, grad_out)
        return self._unpad(grad_in, input_shape)
