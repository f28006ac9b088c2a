"""2-D convolution (PyTorch's ``nn.Conv2d`` without dilation and groups), via im2col + GEMM."""
from __future__ import annotations

from typing import Any

import numpy as np

from dtrain.backend import DEFAULT_DTYPE, get_array_module
from dtrain.checks import check_int
from dtrain.nn.blocks import for_blocks
from dtrain.nn.checks import check_dim, check_dtype, check_rank, pair
from dtrain.nn.gemm import matmul
from dtrain.nn.im2col import col2im, im2col, sliding_output_hw
from dtrain.nn.init import bias_uniform, initialize
from dtrain.nn.layout import as_nchw, batch_last
from dtrain.nn.module import Array, Module, Shape
from dtrain.nn.workspace import Workspace


class Conv2d(Module):
    """Cross-correlation of (N, C, H, W) with ``weight`` (F, C, kh, kw) plus ``bias`` (F,) -> (N, F, OH, OW).

    ``OH = (H + 2*padding - kh) // stride + 1`` (likewise OW). Forward is one GEMM
    ``weight.reshape(F, C*kh*kw) @ cols`` on the im2col matrix (see
    :mod:`dtrain.nn.im2col` for its layout); backward is two GEMMs (weight gradient,
    written into ``grads["weight"]`` in place, and column gradient) and col2im. All GEMMs
    go through :func:`dtrain.nn.gemm.matmul`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        init: str = "kaiming_normal",
        rng: np.random.Generator | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_int(in_channels, "Conv2d: in_channels", 1)
        self.out_channels = check_int(out_channels, "Conv2d: out_channels", 1)
        self.has_bias = bool(bias)
        self.kernel_size = pair(kernel_size, "kernel_size", "Conv2d")
        self.stride = pair(stride, "stride", "Conv2d")
        self.padding = pair(padding, "padding", "Conv2d")
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(
                f"Conv2d: kernel_size and stride must be positive, got kernel_size={kernel_size!r}, stride={stride!r}"
            )
        if min(self.padding) < 0:
            raise ValueError(f"Conv2d: padding must be non-negative, got {padding!r}")
        rng = rng if rng is not None else np.random.default_rng()
        dtype = np.dtype(dtype if dtype is not None else DEFAULT_DTYPE)
        shape = (out_channels, in_channels, *self.kernel_size)
        self.register_param("weight", initialize(init, rng, shape, layer=repr(self)).astype(dtype))
        if self.has_bias:
            fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
            self.register_param("bias", bias_uniform(rng, fan_in, out_channels).astype(dtype))
        self._workspace = Workspace()
        # (input shape, im2col matrix) from the last forward; backward consumes it.
        self._saved: tuple[Shape, Array] | None = None

    def forward(self, x: Array) -> Array:
        """(N, C, H, W) -> (N, F, OH, OW), a view of new batch-last memory (see :mod:`dtrain.nn.layout`)."""
        check_rank(self, x, 4, "N, C, H, W")
        check_dtype(self, x, self.params["weight"].dtype)
        f, oh, ow = self.output_shape(x.shape[1:])
        xp = get_array_module(x)
        n = x.shape[0]
        cols = im2col(x, self.kernel_size, self.stride, self.padding, (oh, ow), self._workspace)
        y = xp.empty((f, oh * ow * n), dtype=x.dtype)  # new memory: the caller keeps it
        matmul(self._weight_matrix(), cols, out=y)
        if self.has_bias:
            bias = self.params["bias"].reshape(f, 1)

            def add_bias(start: int, stop: int) -> None:
                y[start:stop] += bias[start:stop]

            for_blocks(add_bias, f, y[0].nbytes, y)
        self._saved = (tuple(x.shape), cols)
        return as_nchw(y.reshape(f, oh, ow, n))

    def backward(self, grad_out: Array) -> Array:
        """(N, F, OH, OW) -> (N, C, H, W); writes the weight and bias gradients in place.

        The input gradient is a view of new batch-last memory. The column matrix cached by
        ``forward`` is overwritten with its gradient, so each ``forward`` supports exactly
        one ``backward``.
        """
        if self._saved is None:
            raise RuntimeError(f"{self!r}: backward needs a forward first (each forward supports one backward)")
        check_rank(self, grad_out, 4, "N, F, OH, OW")
        (input_shape, cols), self._saved = self._saved, None
        n, f, oh, ow = grad_out.shape
        expected = (input_shape[0], *self.output_shape(input_shape[1:]))
        if tuple(grad_out.shape) != expected:
            raise ValueError(f"{self!r}: grad_out has shape {tuple(grad_out.shape)}, the forward output was {expected}")
        xp = get_array_module(grad_out)
        # (F, OH*OW*N): grad_out's own memory when it is batch-last, as ReLU and pooling leave it.
        g_cols = batch_last(grad_out, self._workspace, "g_cols").reshape(f, oh * ow * n)
        if self.has_bias:
            xp.sum(g_cols, axis=1, out=self.grads["bias"])
        matmul(g_cols, cols.T, out=self._weight_grad_matrix())
        # The weight gradient was the last use of the columns: reuse their memory.
        matmul(self._weight_matrix().T, g_cols, out=cols)
        return col2im(cols, input_shape, self.kernel_size, self.stride, self.padding, (oh, ow))

    def _weight_matrix(self) -> Array:
        """The weight as an (F, C*kh*kw) view whose columns match the im2col rows."""
        return self.params["weight"].reshape(self.out_channels, -1)

    def _weight_grad_matrix(self) -> Array:
        """``grads["weight"]`` as an (F, C*kh*kw) view, so that the GEMM writes it in place."""
        grad = self.grads["weight"]
        if not grad.flags.c_contiguous:  # reshape would silently return a copy
            raise RuntimeError(f"{self!r}: grads['weight'] must be C-contiguous to be written in place")
        return grad.reshape(self.out_channels, -1)

    def output_shape(self, input_shape: Shape) -> Shape:
        oh, ow = sliding_output_hw(self, input_shape, self.kernel_size, self.stride, self.padding)
        check_dim(self, tuple(input_shape), 0, self.in_channels, "input channels")
        return (self.out_channels, oh, ow)

    def flops(self, input_shape: Shape) -> int:
        f, oh, ow = self.output_shape(input_shape)
        return 2 * f * oh * ow * self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if not self.has_bias:
            text += ", bias=False"
        return text
