"""2-D max and average pooling (PyTorch's ``nn.MaxPool2d`` / ``nn.AvgPool2d``, floor mode).

Both work on the batch-last (C, H, W, N) form of the input (see :mod:`dtrain.nn.layout`)
and return batch-last memory as (N, C, OH, OW) views. Each pass is one kernel over the
whole array (:mod:`dtrain.nn.kernels`: Numba on the CPU, CUDA on the GPU, the same
arithmetic on both): forward reads every input once; backward gathers, each input
summing the gradients of the outputs whose windows it belongs to (max pooling: that it
won), kernel offsets in increasing order, so overlapping windows (kernel 3, stride 2) sum
deterministically. Padding is handled inside the kernels, without a padded copy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from dtrain.backend import get_array_module
from dtrain.nn.checks import check_rank, pair
from dtrain.nn.im2col import sliding_output_hw
from dtrain.nn.kernels import kernels_for
from dtrain.nn.layout import as_nchw, batch_last
from dtrain.nn.module import Array, Module, Shape
from dtrain.nn.workspace import Workspace


class _Pool2d(Module):
    """Window geometry, validation and the batch-last input and gradient arrays of the pooling layers."""

    fresh_output = True  # forward returns new memory and keeps none of it

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

    def _start_forward(self, x: Array) -> tuple[Array, tuple[int, int]]:
        """``x`` batch-last (C, H, W, N) and the output's (OH, OW); validates ``x``."""
        check_rank(self, x, 4, "N, C, H, W")
        _, oh, ow = self.output_shape(x.shape[1:])
        self._input_shape = tuple(x.shape)
        return batch_last(x, self._workspace, "input"), (oh, ow)

    def _start_backward(self, grad_out: Array) -> tuple[tuple[int, ...], Array]:
        """The forward input's (C, H, W, N) shape and ``grad_out`` batch-last (C, OH, OW, N); validates ``grad_out``."""
        if self._input_shape is None:
            raise RuntimeError(f"{self!r}: backward needs a forward first (each forward supports one backward)")
        input_shape, self._input_shape = self._input_shape, None
        expected = (input_shape[0], *self.output_shape(input_shape[1:]))
        got = tuple(getattr(grad_out, "shape", ()))
        if got != expected:
            raise ValueError(f"{self!r}: grad_out has shape {got}, the forward output was {expected}")
        n, c, h, w = input_shape
        return (c, h, w, n), batch_last(grad_out, self._workspace, "grad_out")

    def _geometry(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        return self.kernel_size, self.stride, self.padding

    def extra_repr(self) -> str:
        def show(v: tuple[int, int]) -> Any:
            return v[0] if v[0] == v[1] else v

        return f"kernel_size={show(self.kernel_size)}, stride={show(self.stride)}, padding={show(self.padding)}"


class MaxPool2d(_Pool2d):
    """Maximum over each window of (N, C, H, W) -> (N, C, OH, OW); padding never wins.

    Backward routes each output's gradient to exactly one input: the first maximum of
    its window in row-major scan order (PyTorch's choice on ties). After a ReLU
    (``forward_after_relu``, as :class:`dtrain.nn.Sequential` calls it) a window whose
    maximum is <= 0 routes its gradient nowhere: that is ReLU's backward at the winner, so
    ``backward_through_relu`` runs both and the ReLU need not keep its output.
    """

    fuses_relu_before = True

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__(kernel_size, stride, padding)
        self._gated = False  # whether the last forward ran after a ReLU

    def _argmax(self, shape: Shape, xp: Any) -> Array:
        """Workspace buffer of the (C, OH, OW, N) offset index of each window's maximum, as forward left it.

        Its dtype is the smallest integer type that holds kh*kw (kh*kw itself: no winner).
        """
        dtype = np.min_scalar_type(self.kernel_size[0] * self.kernel_size[1])
        return self._workspace.get("argmax", shape, dtype, xp)

    def forward(self, x: Array) -> Array:
        """(N, C, H, W) -> (N, C, OH, OW); remembers which kernel offset won each window."""
        return self._forward(x, gated=False)

    def forward_after_relu(self, x: Array) -> Array:
        """``forward`` of a ReLU's output ``x``, noting for ``backward_through_relu`` the
        windows whose maximum is <= 0."""
        return self._forward(x, gated=True)

    def _forward(self, x: Array, gated: bool) -> Array:
        source, out_hw = self._start_forward(x)
        argmax = self._argmax((source.shape[0], *out_hw, source.shape[3]), get_array_module(source))
        self._gated = gated
        return as_nchw(kernels_for(source).max_pool_forward(source, *self._geometry(), out_hw, argmax, gated))

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array:
        """(N, C, OH, OW) -> (N, C, H, W): each output's gradient goes to its window's argmax."""
        if self._gated:
            raise RuntimeError(f"{self!r}: forward_after_relu was run; its backward is backward_through_relu")
        return self._backward(grad_out)

    def backward_through_relu(self, grad_out: Array) -> Array:
        """``backward`` followed by that of the ReLU whose output the input was (after
        ``forward_after_relu``): windows whose maximum was <= 0 pass no gradient."""
        if not self._gated:
            raise RuntimeError(f"{self!r}: backward_through_relu needs forward_after_relu first")
        return self._backward(grad_out)

    def _backward(self, grad_out: Array) -> Array:
        input_chwn, grad = self._start_backward(grad_out)
        argmax = self._argmax(grad.shape, get_array_module(grad))
        return as_nchw(kernels_for(grad).max_pool_backward(grad, argmax, input_chwn, *self._geometry()))


class AvgPool2d(_Pool2d):
    """Mean over each window of (N, C, H, W) -> (N, C, OH, OW).

    Padded zeros count towards the mean (PyTorch's default ``count_include_pad=True``),
    so every window divides by kh*kw.
    """

    def forward(self, x: Array) -> Array:
        """(N, C, H, W) -> (N, C, OH, OW)."""
        source, out_hw = self._start_forward(x)
        return as_nchw(kernels_for(source).avg_pool_forward(source, *self._geometry(), out_hw))

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array:
        """(N, C, OH, OW) -> (N, C, H, W): each window input gets grad / (kh*kw)."""
        input_chwn, grad = self._start_backward(grad_out)
        return as_nchw(kernels_for(grad).avg_pool_backward(grad, input_chwn, *self._geometry()))
