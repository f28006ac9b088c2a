"""2-D max and average pooling (PyTorch's ``nn.MaxPool2d`` / ``nn.AvgPool2d``, floor mode).

Both loop over the kh*kw kernel offsets only: for one offset, the inputs under it for
every output pixel form one strided slice of the (padded) input, so each step is a
whole-batch array operation. Backward adds each offset's share of the output gradient
into a zeroed padded buffer through the same slices, which also sums correctly where
windows overlap (kernel 3, stride 2).
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from dtrain.backend import get_array_module
from dtrain.nn.checks import check_rank, pair
from dtrain.nn.im2col import kernel_offsets, sliding_output_hw, window
from dtrain.nn.module import Array, Module, Shape
from dtrain.nn.workspace import Workspace


class _Pool2d(Module):
    """Window geometry, validation and gradient scatter shared by the pooling layers."""

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
        """``x`` itself without padding, else a workspace copy inside a ``pad_value`` border."""
        if self.padding == (0, 0):
            return x
        xp = get_array_module(x)
        n, c, h, w = x.shape
        ph, pw = self.padding
        padded = self._workspace.get("padded", (n, c, h + 2 * ph, w + 2 * pw), x.dtype, xp, fill=self.pad_value)
        padded[:, :, ph:ph + h, pw:pw + w] = x
        return padded

    def _windows(self, padded: Array, out_hw: tuple[int, int]) -> Iterator[tuple[int, Array]]:
        """``(offset index, slice of padded)`` for each kernel offset: the inputs under that offset."""
        for index, i, j in kernel_offsets(self.kernel_size):
            yield index, padded[:, :, window(i, out_hw[0], self.stride[0]), window(j, out_hw[1], self.stride[1])]

    def _start_forward(self, x: Array) -> tuple[int, int]:
        check_rank(self, x, 4, "N, C, H, W")
        _, oh, ow = self.output_shape(x.shape[1:])
        self._input_shape = tuple(x.shape)
        return oh, ow

    def _start_backward(self, grad_out: Array) -> tuple[Shape, Array]:
        """The forward's input shape and a zeroed padded gradient buffer; validates ``grad_out``."""
        if self._input_shape is None:
            raise RuntimeError(f"{self!r}: backward needs a forward first (each forward supports one backward)")
        input_shape, self._input_shape = self._input_shape, None
        expected = (input_shape[0], *self.output_shape(input_shape[1:]))
        got = tuple(getattr(grad_out, "shape", ()))
        if got != expected:
            raise ValueError(f"{self!r}: grad_out has shape {got}, the forward output was {expected}")
        xp = get_array_module(grad_out)
        n, c, h, w = input_shape
        ph, pw = self.padding
        grad_padded = self._workspace.get("grad_padded", (n, c, h + 2 * ph, w + 2 * pw), grad_out.dtype, xp)
        grad_padded[...] = 0
        return input_shape, grad_padded

    def _unpad(self, grad_padded: Array, input_shape: Shape) -> Array:
        """A new (N, C, H, W) array with the interior of the padded gradient."""
        _, _, h, w = input_shape
        ph, pw = self.padding
        return grad_padded[:, :, ph:ph + h, pw:pw + w].copy()  # a copy even without padding: never hand out workspace

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

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__(kernel_size, stride, padding)
        self._argmax: Array | None = None

    def forward(self, x: Array) -> Array:
        """(N, C, H, W) -> (N, C, OH, OW); remembers which kernel offset won each window."""
        out_hw = self._start_forward(x)
        xp = get_array_module(x)
        windows = self._windows(self._padded_input(x), out_hw)
        _, first = next(windows)
        best = first.copy()
        # Offset index of each window's maximum, in the smallest integer type that holds kh*kw - 1.
        argmax = xp.zeros(best.shape, dtype=np.min_scalar_type(self.kernel_size[0] * self.kernel_size[1] - 1))
        better = xp.empty(best.shape, dtype=bool)
        candidate = xp.empty_like(best)
        for index, window_values in windows:
            # One strided pass into a contiguous buffer: the two comparisons then run at full speed.
            candidate[...] = window_values
            xp.greater(candidate, best, out=better)  # strict: on ties the earlier offset keeps the win
            xp.maximum(best, candidate, out=best)
            # Offsets come in increasing order, so max() sets argmax to index exactly where better
            # (a masked copy would do the same but is several times slower in NumPy).
            xp.maximum(argmax, better * argmax.dtype.type(index), out=argmax)
        self._argmax = argmax
        return best

    def backward(self, grad_out: Array) -> Array:
        """(N, C, OH, OW) -> (N, C, H, W): each output's gradient goes to its window's argmax."""
        input_shape, grad_padded = self._start_backward(grad_out)
        xp = get_array_module(grad_out)
        argmax, self._argmax = self._argmax, None
        won = xp.empty(argmax.shape, dtype=bool)
        share = xp.empty(grad_out.shape, dtype=grad_out.dtype)
        for index, target in self._windows(grad_padded, grad_out.shape[2:]):
            xp.equal(argmax, index, out=won)
            xp.multiply(grad_out, won, out=share)
            target += share
        return self._unpad(grad_padded, input_shape)


class AvgPool2d(_Pool2d):
    """Mean over each window of (N, C, H, W) -> (N, C, OH, OW).

    Padded zeros count towards the mean (PyTorch's default ``count_include_pad=True``),
    so every window divides by kh*kw.
    """

    def forward(self, x: Array) -> Array:
        """(N, C, H, W) -> (N, C, OH, OW)."""
        out_hw = self._start_forward(x)
        windows = self._windows(self._padded_input(x), out_hw)
        _, first = next(windows)
        total = first.copy()
        for _, window_values in windows:
            total += window_values
        total *= 1.0 / (self.kernel_size[0] * self.kernel_size[1])
        return total

    def backward(self, grad_out: Array) -> Array:
        """(N, C, OH, OW) -> (N, C, H, W): each window input gets grad / (kh*kw)."""
        input_shape, grad_padded = self._start_backward(grad_out)
        share = grad_out * (1.0 / (self.kernel_size[0] * self.kernel_size[1]))
        for _, target in self._windows(grad_padded, grad_out.shape[2:]):
            target += share
        return self._unpad(grad_padded, input_shape)
