"""2-D convolution (PyTorch's ``nn.Conv2d`` without dilation and groups), via im2col + GEMM, direct or Winograd."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from dtrain.backend import DEFAULT_DTYPE, get_array_module
from dtrain.checks import check_int
from dtrain.nn import winograd
from dtrain.nn.checks import check_dim, check_dtype, check_rank, pair
from dtrain.nn.gemm import matmul
from dtrain.nn.im2col import pixel_blocks, sliding_output_hw
from dtrain.nn.init import bias_uniform, initialize
from dtrain.nn.kernels import kernels_for
from dtrain.nn.layout import as_nchw, batch_last
from dtrain.nn.module import Array, Module, Shape
from dtrain.nn.workspace import Workspace, shared_ones, shared_scratch


class Conv2d(Module):
    """Cross-correlation of (N, C, H, W) with ``weight`` (F, C, kh, kw) plus ``bias`` (F,) -> (N, F, OH, OW).

    ``OH = (H + 2*padding - kh) // stride + 1`` (likewise OW). The products run block by
    block of output pixels (see :mod:`dtrain.nn.im2col` for the column layout and the
    blocks): forward is ``weight.reshape(F, C*kh*kw) @ cols`` per block; backward builds
    each block's columns again from the input that forward kept (or, when a single block
    held them all, uses forward's, kept in the layer's own buffer), adds ``dY @ cols.T`` into
    the weight gradient (written into ``grads["weight"]`` in place) and, unless the input
    gradient is not wanted, multiplies ``weight.T @ dY`` and adds it back with col2im. All
    GEMMs go through :func:`dtrain.nn.gemm.matmul`.

    A layer with few multiply-adds per output value (few filters of few taps, as first
    layers on one image channel have) runs forward and the weight gradient as a direct
    convolution on the CPU instead, without columns; its input gradient, if wanted, still
    takes the GEMM and col2im (:func:`dtrain.nn.cpu_kernels.direct_conv_pays` decides).
    A wide stride-1 layer with a square kernel (AlexNet's conv2 to conv5) runs as Winograd's
    F(m x m, r x r) on the CPU instead (:mod:`dtrain.nn.winograd`; ``winograd_tile`` of the
    kernel set decides, and picks m).

    In a :class:`dtrain.nn.Sequential` the layer also runs the ReLUs around it: the one after
    it as it writes its output (``forward_relu``), the one before it as it writes its input
    gradient (``backward_through_relu``: col2im or the Winograd transform zero the gradient
    where the input, that ReLU's output, is <= 0).
    """

    fresh_output = True  # forward returns new memory and keeps none of it
    fuses_relu_after = True
    fuses_relu_before = True

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
        self.register_param("weight", initialize(init, rng, shape, repr(self), dtype))
        if self.has_bias:
            fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
            self.register_param("bias", bias_uniform(rng, fan_in, out_channels).astype(dtype))
        self._workspace = Workspace()
        # The batch-last (C, H, W, N) input of the last forward; backward consumes it.
        self._saved: Array | None = None
        # The forward's columns when they were one block (in this layer's own buffer), so
        # that backward need not compute them again; None when backward recomputes blocks.
        self._kept_cols: Array | None = None

    def forward(self, x: Array) -> Array:
        """(N, C, H, W) -> (N, F, OH, OW), a view of new batch-last memory (see :mod:`dtrain.nn.layout`).

        Keeps the input for backward: ``x`` itself when it is batch-last (as every dtrain
        layer returns it; it must not change before backward), else a batch-last copy.
        """
        return self._forward(x, relu=False)

    def forward_relu(self, x: Array) -> Array:
        """``forward`` followed by ReLU, applied as each output value is written (the
        output then needs no pass of its own; see :class:`dtrain.nn.Sequential`)."""
        return self._forward(x, relu=True)

    def _forward(self, x: Array, relu: bool) -> Array:
        check_rank(self, x, 4, "N, C, H, W")
        check_dtype(self, x, self.params["weight"].dtype)
        f, oh, ow = self.output_shape(x.shape[1:])
        xp = get_array_module(x)
        n = x.shape[0]
        source = batch_last(x, self._workspace, "input")
        y = xp.empty((f, oh * ow * n), dtype=x.dtype)  # new memory: the caller keeps it
        self._kept_cols = None
        if self._direct(source):
            kernels_for(source).conv_direct_forward(source, self.params["weight"], self.params.get("bias"),
                                                    self.stride, self.padding, y.reshape(f, oh, ow, n), relu)
        elif tile := self._winograd_tile(source, (oh, ow)):
            winograd.forward(kernels_for(source), source, self.params["weight"], self.params.get("bias"),
                             self.padding, tile, y.reshape(f, oh, ow, n), relu)
        else:
            self._gemm_forward(source, y, (oh, ow), relu)
        self._saved = source
        return as_nchw(y.reshape(f, oh, ow, n))

    def _gemm_forward(self, source: Array, y: Array, out_hw: tuple[int, int], relu: bool) -> None:
        """``y`` (F, OH*OW*N) = the weight matrix times each block's columns, plus the bias,
        and with ``relu`` its ``maximum(., 0)``."""
        n = source.shape[3]
        weight = self._weight_matrix()
        for first, cols in self._column_blocks(source, out_hw):
            matmul(weight, cols, out=y[:, first * n:first * n + cols.shape[1]])
        # One block (it starts at pixel 0 and holds them all): its columns stay for backward.
        self._kept_cols = cols if first == 0 and cols.shape[1] == y.shape[1] else None
        if self.has_bias or relu:
            kernels_for(y).bias_relu(y, self.params.get("bias"), relu)

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array | None:
        """(N, F, OH, OW) -> (N, C, H, W); writes the weight and bias gradients in place.

        The input gradient is a view of new batch-last memory; with ``input_grad=False``
        it is not computed (the first layer's: nobody needs it) and None is returned.
        Each ``forward`` supports exactly one ``backward``.
        """
        return self._backward(grad_out, input_grad, relu_before=False)

    def backward_through_relu(self, grad_out: Array) -> Array:
        """``backward``, then the backward of the ReLU whose output was this layer's input,
        applied as the input gradient is written (col2im zeroes it where the input is <= 0;
        see :class:`dtrain.nn.Sequential`)."""
        return self._backward(grad_out, True, relu_before=True)

    def _backward(self, grad_out: Array, input_grad: bool, relu_before: bool) -> Array | None:
        if self._saved is None:
            raise RuntimeError(f"{self!r}: backward needs a forward first (each forward supports one backward)")
        check_rank(self, grad_out, 4, "N, F, OH, OW")
        source, self._saved = self._saved, None
        kept, self._kept_cols = self._kept_cols, None
        c, h, w, n = source.shape
        expected = (n, *self.output_shape((c, h, w)))
        if tuple(grad_out.shape) != expected:
            raise ValueError(f"{self!r}: grad_out has shape {tuple(grad_out.shape)}, the forward output was {expected}")
        xp = get_array_module(grad_out)
        _, f, oh, ow = grad_out.shape
        # (F, OH*OW*N): grad_out's own memory when it is batch-last, as ReLU and pooling leave it.
        g = batch_last(grad_out, self._workspace, "g_cols").reshape(f, oh * ow * n)
        weight = self._weight_matrix()
        kernels = kernels_for(source)
        direct = self._direct(source)
        if self.has_bias and not direct:  # the direct kernel sums the bias gradient itself
            # Row sums as a product with ones: BLAS's GEMV streams g on every BLAS thread
            # and in wide vectors; xp.sum along rows is several times slower on the CPU.
            xp.matmul(g, shared_ones(g.shape[1], g.dtype, xp), out=self.grads["bias"])
        # Written by the first block's col2im or Winograd transform (fresh): no zeroing pass.
        grad_in = xp.empty(source.shape, dtype=source.dtype) if input_grad else None
        if direct:
            kernels.conv_direct_weight_grad(source, g.reshape(f, oh, ow, n), self.stride, self.padding,
                                            self.grads["weight"], self.grads.get("bias"))
            # The input gradient, if wanted, still goes through columns: weight.T @ dY, then col2im.
            blocks = self._column_blocks(source, (oh, ow), fill=False) if input_grad else []
        elif tile := self._winograd_tile(source, (oh, ow)):
            winograd.backward(kernels, source, g.reshape(f, oh, ow, n), self.params["weight"], self.padding, tile,
                              self.grads["weight"], grad_in, relu_before)
            return None if grad_in is None else as_nchw(grad_in)
        else:
            blocks = [(0, kept)] if kept is not None else self._column_blocks(source, (oh, ow))
        for index, (first, cols) in enumerate(blocks):
            g_block = g[:, first * n:first * n + cols.shape[1]]
            if not direct:
                self._add_weight_grad(g_block, cols, accumulate=index > 0)
            if grad_in is not None:
                matmul(weight.T, g_block, out=cols)  # the block's columns are used up: reuse them
                last = first * n + cols.shape[1] == g.shape[1]
                kernels.col2im_add(cols, grad_in, self.kernel_size, self.stride, self.padding, (oh, ow), first,
                                   fresh=index == 0, gate=source if relu_before and last else None)
        return None if grad_in is None else as_nchw(grad_in)

    def _add_weight_grad(self, g_block: Array, cols: Array, accumulate: bool) -> None:
        """Write ``g_block @ cols.T`` (F, C*kh*kw) into the weight gradient, or add it for the
        blocks after the first."""
        weight_grad = self._weight_grad_matrix()
        if not accumulate:
            matmul(g_block, cols.T, out=weight_grad)
            return
        # BLAS cannot accumulate through NumPy/CuPy: one small product, then an add.
        xp = get_array_module(weight_grad)
        partial = self._workspace.get("weight_grad_block", weight_grad.shape, weight_grad.dtype, xp)
        matmul(g_block, cols.T, out=partial)
        weight_grad += partial

    def _direct(self, source: Array) -> bool:
        """Whether this layer runs as a direct convolution on ``source``'s device (see
        :func:`dtrain.nn.cpu_kernels.direct_conv_pays`) instead of im2col + GEMM."""
        rows = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return kernels_for(source).direct_conv_pays(self.out_channels, rows)

    def _winograd_tile(self, source: Array, out_hw: tuple[int, int]) -> int:
        """The output tile side with which this layer runs as Winograd F(m x m, r x r) on
        ``source``'s device (see :mod:`dtrain.nn.winograd`), 0 when it does not."""
        return kernels_for(source).winograd_tile(self.out_channels, self.in_channels, self.kernel_size, self.stride,
                                                 out_hw, source.dtype)

    def _column_blocks(self, source: Array, out_hw: tuple[int, int], fill: bool = True
                       ) -> Iterator[tuple[int, Array]]:
        """``(first pixel, cols)`` for each block of output pixels: the block's (C*kh*kw, P*N)
        columns of the batch-last input ``source`` (left unfilled with ``fill=False``), in the
        thread's shared im2col buffer; when one block holds them all, in this layer's own
        buffer (kept for backward: no larger than a block)."""
        c, _, _, n = source.shape
        kernels, xp = kernels_for(source), get_array_module(source)
        rows = c * self.kernel_size[0] * self.kernel_size[1]
        blocks = list(pixel_blocks(out_hw[0] * out_hw[1], rows * n * source.itemsize, kernels.COLUMN_BLOCK_BYTES))
        largest = max(count for _, count in blocks)
        if len(blocks) == 1:
            buffer = self._workspace.get("cols", (rows * largest * n,), source.dtype, xp)
        else:
            buffer = shared_scratch("columns", rows * largest * n, source.dtype, xp)
        for first, count in blocks:
            cols = buffer[:rows * count * n].reshape(rows, count * n)
            if fill:
                kernels.im2col(source, self.kernel_size, self.stride, self.padding, out_hw, cols, first)
            yield first, cols

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
