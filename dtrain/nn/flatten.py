"""Flatten: collapse dims ``start_dim .. end_dim`` into one (PyTorch's ``nn.Flatten``)."""
from __future__ import annotations

import math

from dtrain.checks import check_int
from dtrain.nn.module import Array, Module, Shape


class Flatten(Module):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...) with the defaults; the batch axis is never merged."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        check_int(start_dim, "Flatten: start_dim", 1)  # axis 0 is the batch
        check_int(end_dim, "Flatten: end_dim")
        self.start_dim = start_dim
        self.end_dim = end_dim
        self._in_shape: Shape | None = None

    def _flat_shape(self, shape: Shape) -> Shape:
        """The flattened version of a full (batch-included) shape."""
        end = self.end_dim if self.end_dim >= 0 else len(shape) + self.end_dim
        if not self.start_dim <= end < len(shape):
            raise ValueError(
                f"{self!r} cannot flatten dims {self.start_dim}..{self.end_dim} of a "
                f"{len(shape)}-D input of shape {tuple(shape)}"
            )
        merged = math.prod(shape[self.start_dim : end + 1])
        return tuple(shape[: self.start_dim]) + (merged,) + tuple(shape[end + 1 :])

    def forward(self, x: Array) -> Array:
        self._in_shape = tuple(x.shape)
        return x.reshape(self._flat_shape(self._in_shape))

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array:
        if self._in_shape is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        return grad_out.reshape(self._in_shape)

    def output_shape(self, input_shape: Shape) -> Shape:
        return self._flat_shape((1,) + tuple(input_shape))[1:]

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
