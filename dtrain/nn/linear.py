"""Fully connected layer ``y = x @ weight.T + bias`` (PyTorch's ``nn.Linear``)."""
from __future__ import annotations

from typing import Any

import numpy as np

from dtrain.backend import DEFAULT_DTYPE, get_array_module
from dtrain.checks import check_int
from dtrain.nn.checks import check_dim, check_dtype, check_rank
from dtrain.nn.gemm import matmul
from dtrain.nn.init import bias_uniform, initialize
from dtrain.nn.module import Array, Module, Shape
from dtrain.nn.workspace import shared_ones


class Linear(Module):
    """Affine map of (N, in_features) to (N, out_features).

    The output and the input gradient come back in the input's memory order: an input
    that is the transpose of C-contiguous (in_features, N) memory, as Flatten makes of a
    batch-last activation, gets its output as the transpose of (out_features, N) memory
    and its gradient as the transpose of (in_features, N) memory, so that no layer before
    or after need reorder them. ``weight`` has shape (out_features, in_features) and
    ``bias`` (out_features,), as in PyTorch. All three matrix products (forward, input
    gradient, weight gradient) go through :func:`dtrain.nn.gemm.matmul`; the weight
    gradient is written straight into ``grads["weight"]``.
    """

    fresh_output = True  # forward returns new memory and keeps none of it
    fuses_relu_after = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init: str = "kaiming_normal",
        rng: np.random.Generator | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int(in_features, "Linear: in_features", 1)
        self.out_features = check_int(out_features, "Linear: out_features", 1)
        rng = rng if rng is not None else np.random.default_rng()
        dtype = np.dtype(dtype if dtype is not None else DEFAULT_DTYPE)
        self.register_param("weight", initialize(init, rng, (out_features, in_features), repr(self), dtype))
        if bias:
            self.register_param("bias", bias_uniform(rng, in_features, out_features).astype(dtype))
        self._x: Array | None = None

    def _check_input(self, x: Array) -> None:
        check_rank(self, x, 2, "N, in_features")
        check_dim(self, x.shape, 1, self.in_features, "input features")
        check_dtype(self, x, self.params["weight"].dtype)

    def forward(self, x: Array) -> Array:
        """(N, in_features) -> (N, out_features), in the input's memory order: a batch-last
        input (the transpose of C-contiguous memory) gives a batch-last output."""
        return self._forward(x, relu=False)

    def forward_relu(self, x: Array) -> Array:
        """``forward`` followed by ReLU, in the pass that adds the bias."""
        return self._forward(x, relu=True)

    def _forward(self, x: Array, relu: bool) -> Array:
        self._check_input(x)
        self._x = x
        if _batch_last(x):  # weight @ x.T on C-contiguous operands: no transposition flag for BLAS
            y = matmul(self.params["weight"], x.T).T
        else:
            y = matmul(x, self.params["weight"].T)
        if "bias" in self.params:
            y += self.params["bias"]
        if relu:
            get_array_module(y).maximum(y, 0, out=y)
        return y

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array | None:
        """(N, out_features) -> (N, in_features); writes grads of weight and bias in place.
        With ``input_grad=False`` the input gradient is not computed and None is returned."""
        if self._x is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        matmul(grad_out.T, self._x, out=self.grads["weight"])
        if "bias" in self.grads:  # column sums as ones @ grad_out: a GEMV (see Conv2d's bias gradient)
            xp = get_array_module(grad_out)
            xp.matmul(shared_ones(grad_out.shape[0], grad_out.dtype, xp), grad_out, out=self.grads["bias"])
        if not input_grad:
            return None
        if _batch_last(self._x):
            return matmul(self.params["weight"].T, grad_out.T).T
        return matmul(grad_out, self.params["weight"])

    def output_shape(self, input_shape: Shape) -> Shape:
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(
                f"{self!r} expects per-sample input shape ({self.in_features},), got {tuple(input_shape)}; "
                f"put a Flatten before it or fix in_features"
            )
        return (self.out_features,)

    def flops(self, input_shape: Shape) -> int:
        self.output_shape(input_shape)
        return 2 * self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={'bias' in self.params}"


def _batch_last(x: Array) -> bool:
    """Whether the 2-D ``x`` is the transpose of C-contiguous (features, N) memory, as Flatten
    makes of a batch-last activation."""
    return x.T.flags.c_contiguous and not x.flags.c_contiguous
