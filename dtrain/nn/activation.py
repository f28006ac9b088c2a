"""Elementwise activations: ReLU, LeakyReLU, Tanh, Sigmoid (any input shape)."""
from __future__ import annotations

from dtrain.backend import get_array_module
from dtrain.nn.blocks import elementwise
from dtrain.nn.kernels import kernels_for
from dtrain.nn.module import Array, Module


class _Elementwise(Module):
    """Shared guard: backward needs the cache that forward leaves."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: Array | None = None

    def _cached(self) -> Array:
        if self._cache is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        return self._cache


class ReLU(_Elementwise):
    """``max(x, 0)``; the gradient is 0 where the output is <= 0, as in PyTorch.

    Backward reads the output, not a mask (as PyTorch's does): it zeroes ``grad_out`` in
    place where the output is not positive and returns it (the layer contract lets it).
    Given an input it owns (``forward_owned``) it writes the output over it: one pass over
    memory the layer before has just written, and no new activation. In a
    :class:`dtrain.nn.Sequential`, Conv2d or Linear right before it apply it as they write
    their output (``adopt``), and Conv2d or MaxPool2d right after it run its backward
    (``release``): then no pass of its own is left.
    """

    is_relu = True

    def forward(self, x: Array) -> Array:
        return self._relu(x, get_array_module(x).empty_like(x))  # x's memory layout

    def release(self) -> None:
        """Drop the output kept for backward: the layer after runs this ReLU's backward
        (its ``backward_through_relu``; see :class:`dtrain.nn.Sequential`)."""
        self._cache = None

    def adopt(self, y: Array) -> Array:
        """Be the ReLU of the layer before, which applied it itself (its ``forward_relu``):
        keep that layer's output ``y`` for backward, and return it."""
        self._cache = y
        return y

    def forward_owned(self, x: Array) -> Array:
        return self._relu(x, x)

    def _relu(self, x: Array, y: Array) -> Array:
        """``y = max(x, 0)`` (``y`` may be ``x``), kept for backward."""
        xp = get_array_module(x)
        elementwise(lambda x_, y_: xp.maximum(x_, 0, out=y_), x, y)
        self._cache = y
        return y

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array:
        y = self._cached()
        if grad_out.shape != y.shape:
            raise ValueError(f"{self!r}: grad_out has shape {tuple(grad_out.shape)}, the forward output was "
                             f"{tuple(y.shape)}")
        elementwise(kernels_for(grad_out).relu_backward, grad_out, y)
        return grad_out


class LeakyReLU(_Elementwise):
    """``x`` for x > 0, ``negative_slope * x`` otherwise."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, x: Array) -> Array:
        xp = get_array_module(x)
        self._cache = x > 0
        return xp.where(self._cache, x, x * self.negative_slope)

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array:
        xp = get_array_module(grad_out)
        return xp.where(self._cached(), grad_out, grad_out * self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class Tanh(_Elementwise):
    """Hyperbolic tangent; backward reuses the output: ``1 - y**2``."""

    def forward(self, x: Array) -> Array:
        xp = get_array_module(x)
        self._cache = xp.tanh(x)
        return self._cache

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array:
        y = self._cached()
        return grad_out * (1 - y * y)


class Sigmoid(_Elementwise):
    """Logistic function; exponentiates only ``-|x|`` so it never overflows."""

    def forward(self, x: Array) -> Array:
        xp = get_array_module(x)
        z = xp.exp(-xp.abs(x))
        self._cache = xp.where(x >= 0, 1 / (1 + z), z / (1 + z))
        return self._cache

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array:
        y = self._cached()
        return grad_out * y * (1 - y)
