"""2-D convolution (PyTorch's ``nn.Conv2d`` without dilation and groups), via im2col + GEMM, direct or Winograd."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dtrain.backend import DEFAULT_DTYPE, get_array_module
from dtrain.checks import check_int
from dtrain.nn import winograd
from dtrain.nn.checks import check_dim, check_dtype, check_rank, pair
from dtrain.nn.gemm import matmul
from dtrain.nn.im2col import pixel_blocks, sliding_output_hw, tiled_rows
from dtrain.nn.init import bias_uniform, initialize
from dtrain.nn.kernels import kernels_for
from dtrain.nn.layout import as_nchw, batch_last
from dtrain.nn.module import Array, Module, Shape
from dtrain.nn.workspace import Workspace, shared_ones, shared_scratch


@dataclass
class TiledColumns:
    """A convolution's input as its im2col columns, written there by the layer before (see
    :meth:`Conv2d.tiled_columns` and :class:`dtrain.nn.Sequential`)."""

    cols: Array  # (C*kh*kw, OH*OW*N), the convolution's own buffer
    rows: Array  # (C*H*W,) int64: the (C*kh*kw*OH*OW, N) row of each input row, -1 if none
    shape: tuple[int, int, int, int]  # the input's batch-last (C, H, W, N)


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
    layers on one image channel have) runs forward as a direct convolution on the CPU
    instead, without columns (:func:`dtrain.nn.cpu_kernels.direct_conv_pays` decides), and
    its weight gradient too unless its filters far outnumber its taps
    (:func:`~dtrain.nn.cpu_kernels.direct_weight_grad_pays`); its input gradient, if wanted,
    still takes the GEMM and col2im.
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
    takes_tiled_input = True
    writes_tiled_output = True

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
        # The last forward's input when the layer before wrote it as columns (then _saved is None).
        self._tiled: TiledColumns | None = None
        # (input and output sizes, tiled_rows map) of the last tiled_columns call.
        self._tiled_map: tuple[Any, Array | None] = (None, None)

    def forward(self, x: Array | TiledColumns) -> Array:
        """(N, C, H, W) -> (N, F, OH, OW), a view of new batch-last memory (see :mod:`dtrain.nn.layout`).

        Keeps the input for backward: ``x`` itself when it is batch-last (as every dtrain
        layer returns it; it must not change before backward), else a batch-last copy. In a
        :class:`dtrain.nn.Sequential`, ``x`` may instead be this layer's columns, which the
        layer before filled (:meth:`tiled_columns`).
        """
        return self._forward(x, relu=False)

    def forward_relu(self, x: Array | TiledColumns) -> Array:
        """``forward`` followed by ReLU, applied as each output value is written (the
        output then needs no pass of its own; see :class:`dtrain.nn.Sequential`)."""
        return self._forward(x, relu=True)

    def forward_relu_into(self, x: Array | TiledColumns, into: TiledColumns) -> TiledColumns | None:
        """``forward_relu`` with the output written into the next convolution's columns
        (``into``, from its :meth:`tiled_columns`) instead of new memory, in the pass that
        writes it anyway; returns ``into``, or None, having done nothing, when this layer's
        forward cannot write rows elsewhere (Winograd's output transform)."""
        if not isinstance(x, TiledColumns) and self._winograd_tile(x, self.output_shape(x.shape[1:])[1:]):
            return None
        return self._forward(x, relu=True, into=into)

    def tiled_columns(self, input_shape: Shape, n: int, like: Array) -> TiledColumns | None:
        """Where the layer before may write this layer's input (a ReLU's output of per-sample
        shape ``input_shape``, a batch of ``n``, on ``like``'s device): this layer's own
        column buffer and the row map into it (:func:`dtrain.nn.im2col.tiled_rows`), when
        the kernel set says it pays (``tiled_columns_pay``: windows that tile the input) and
        the columns are one block; else None. Entries no input lands in (padding) are zero."""
        kernels, dtype = kernels_for(like), self.params["weight"].dtype
        if like.dtype != dtype or not kernels.tiled_columns_pay(self.kernel_size, self.stride, dtype):
            return None
        _, oh, ow = self.output_shape(input_shape)
        if self._direct(like) or self._winograd_tile(like, (oh, ow)):
            return None
        rows = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        if rows * oh * ow * n * like.itemsize > kernels.COLUMN_BLOCK_BYTES:  # more than one block of columns
            return None
        key = (tuple(input_shape), (oh, ow))
        if self._tiled_map[0] != key:
            self._tiled_map = (key, tiled_rows(input_shape, self.kernel_size, self.padding, (oh, ow)))
        cols = self._workspace.get("tiled_cols", (rows, oh * ow * n), dtype, get_array_module(like), fill=0)
        return TiledColumns(cols, self._tiled_map[1], (*input_shape, n))

    def _forward(self, x: Array | TiledColumns, relu: bool, into: TiledColumns | None = None) -> Any:
        if isinstance(x, TiledColumns):
            c, h, w, n = x.shape
            source, like = None, x.cols
        else:
            check_rank(self, x, 4, "N, C, H, W")
            check_dtype(self, x, self.params["weight"].dtype)
            n, c, h, w = x.shape
            source = like = batch_last(x, self._workspace, "input")
        f, oh, ow = self.output_shape((c, h, w))
        if into is not None and tuple(into.shape) != (f, oh, ow, n):
            raise ValueError(f"{self!r}: the columns to write its output into are for an input of {into.shape}, "
                             f"its output is {(f, oh, ow, n)} (C, H, W, N)")
        xp, kernels = get_array_module(like), kernels_for(like)
        weight, bias = self.params["weight"], self.params.get("bias")
        self._kept_cols = None
        if source is not None and self._direct(source):
            y = into.cols if into is not None else xp.empty((f, oh, ow, n), dtype=like.dtype)
            kernels.conv_direct_forward(source, weight, bias, self.stride, self.padding, y, relu,
                                        rows=None if into is None else into.rows)
        elif source is not None and into is None and (tile := self._winograd_tile(source, (oh, ow))):
            y = xp.empty((f, oh, ow, n), dtype=like.dtype)
            winograd.forward(kernels, source, weight, bias, self.padding, tile, y, relu)
        else:
            y = self._gemm_forward(x.cols if source is None else source, (f, oh * ow * n), (oh, ow), relu, into)
        self._saved, self._tiled = source, (x if source is None else None)
        return into if into is not None else as_nchw(y.reshape(f, oh, ow, n))

    def _gemm_forward(self, source: Array, out_shape: tuple[int, int], out_hw: tuple[int, int], relu: bool,
                      into: TiledColumns | None) -> Array:
        """The weight matrix times each block's columns (of the batch-last input ``source``,
        or ``source`` itself when it is the 2-D columns the layer before wrote), plus the
        bias, and with ``relu`` its ``maximum(., 0)``: new (F, OH*OW*N) memory, or written
        into ``into`` (through a scratch result)."""
        xp, kernels = get_array_module(source), kernels_for(source)
        if into is None:
            y = xp.empty(out_shape, dtype=source.dtype)  # new memory: the caller keeps it
        else:
            y = self._workspace.get("output", out_shape, source.dtype, xp)
        weight = self._weight_matrix()
        if source.ndim == 2:
            first, cols = 0, source
            matmul(weight, cols, out=y)
        else:
            n = source.shape[3]
            for first, cols in self._column_blocks(source, out_hw):
                matmul(weight, cols, out=y[:, first * n:first * n + cols.shape[1]])
        # One block (it starts at pixel 0 and holds them all): its columns stay for backward.
        self._kept_cols = cols if first == 0 and cols.shape[1] == y.shape[1] else None
        if into is not None:
            kernels.bias_relu_rows(y, self.params.get("bias"), relu, into.rows, into.cols)
        elif self.has_bias or relu:
            kernels.bias_relu(y, self.params.get("bias"), relu)
        return y

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
        if self._saved is None and self._tiled is None:
            raise RuntimeError(f"{self!r}: backward needs a forward first (each forward supports one backward)")
        check_rank(self, grad_out, 4, "N, F, OH, OW")
        source, self._saved = self._saved, None
        tiled, self._tiled = self._tiled, None
        kept, self._kept_cols = self._kept_cols, None
        c, h, w, n = source.shape if tiled is None else tiled.shape
        expected = (n, *self.output_shape((c, h, w)))
        if tuple(grad_out.shape) != expected:
            raise ValueError(f"{self!r}: grad_out has shape {tuple(grad_out.shape)}, the forward output was {expected}")
        xp = get_array_module(grad_out)
        _, f, oh, ow = grad_out.shape
        # (F, OH*OW*N): grad_out's own memory when it is batch-last, as ReLU and pooling leave it.
        g = batch_last(grad_out, self._workspace, "g_cols").reshape(f, oh * ow * n)
        weight = self._weight_matrix()
        kernels = kernels_for(weight)
        direct = tiled is None and self._direct(source, weight_grad=True)
        if self.has_bias and not direct:  # the direct kernel sums the bias gradient itself
            # Row sums as a product with ones: BLAS's GEMV streams g on every BLAS thread
            # and in wide vectors; xp.sum along rows is several times slower on the CPU.
            xp.matmul(g, shared_ones(g.shape[1], g.dtype, xp), out=self.grads["bias"])
        # Written by the first block's col2im or Winograd transform (fresh): no zeroing pass.
        grad_in = xp.empty((c, h, w, n), dtype=weight.dtype) if input_grad else None
        if direct:
            kernels.conv_direct_weight_grad(source, g.reshape(f, oh, ow, n), self.stride, self.padding,
                                            self.grads["weight"], self.grads.get("bias"))
            # The input gradient, if wanted, still goes through columns: weight.T @ dY, then col2im.
            blocks = self._column_blocks(source, (oh, ow), fill=False) if input_grad else []
        elif tiled is None and (tile := self._winograd_tile(source, (oh, ow))):
            winograd.backward(kernels, source, g.reshape(f, oh, ow, n), self.params["weight"], self.padding, tile,
                              self.grads["weight"], grad_in, relu_before)
            return None if grad_in is None else as_nchw(grad_in)
        else:
            blocks = [(0, kept)] if kept is not None else self._column_blocks(source, (oh, ow))
        for index, (first, cols) in enumerate(blocks):
            g_block = g[:, first * n:first * n + cols.shape[1]]
            if not direct:
                self._add_weight_grad(g_block, cols, accumulate=index > 0)
            if grad_in is None:
                continue
            if tiled is not None:
                # The columns are the ReLU output that gates the input gradient: weight.T @ dY
                # goes to scratch, and col2im reads the gate from the columns.
                dcols = shared_scratch("columns", cols.size, cols.dtype, xp).reshape(cols.shape)
                matmul(weight.T, g_block, out=dcols)
                kernels.col2im_tiled(dcols, grad_in, self.kernel_size, self.padding, (oh, ow),
                                     gate=cols if relu_before else None)
                continue
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

    def _direct(self, source: Array, weight_grad: bool = False) -> bool:
        """Whether this layer's forward (with ``weight_grad``: its weight gradient) runs as a
        direct convolution on ``source``'s device (see :func:`dtrain.nn.cpu_kernels.direct_conv_pays`
        and :func:`~dtrain.nn.cpu_kernels.direct_weight_grad_pays`) instead of im2col + GEMM."""
        rows = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        kernels = kernels_for(source)
        return kernels.direct_conv_pays(self.out_channels, rows) and (
            not weight_grad or kernels.direct_weight_grad_pays(self.out_channels, rows))

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
