"""CUDA kernels (CuPy ``ElementwiseKernel``) for im2col, col2im, pooling, a convolution's output pass and ReLU's backward on the GPU.

On the CPU, im2col and col2im are kh*kw strided array copies (:mod:`dtrain.nn.im2col`);
on a GPU each of those would be a kernel launch over the whole array. Here every pass is
one kernel in which each thread computes one output element from its own indices. The
pooling kernels have CPU twins with the same API and arithmetic (:mod:`dtrain.nn.cpu_kernels`).

All arrays are in the batch-last (C, H, W, N) order of :mod:`dtrain.nn.layout`, C-contiguous,
so consecutive threads touch consecutive samples and their loads coalesce. The backward
kernels *gather* (each input element sums the outputs whose windows contain it, kernel
offsets in increasing order, like the CPU kernels) instead of scattering with atomics, so
results are deterministic.

Indices are 64-bit: a batch-512 column matrix of AlexNet's conv2 has 2e8 elements. CuPy
compiles each kernel on first use per dtype and caches it on disk.

On the GPU the column blocks (:data:`COLUMN_BLOCK_BYTES`) are large: device memory is
plentiful, and each block costs a kernel launch and a cuBLAS call.
"""
from __future__ import annotations

import functools
from typing import Any

from dtrain.nn.module import Array

Pair = tuple[int, int]

# Bytes of one block of im2col columns (see dtrain.nn.conv).
COLUMN_BLOCK_BYTES = 256 << 20


def direct_conv_pays(out_channels: int, rows: int) -> bool:
    """Never on the GPU: every convolution runs as im2col + cuBLAS. The CPU's direct kernels
    (:func:`dtrain.nn.cpu_kernels.direct_conv_pays`) are for GEMMs too small to run out of
    the cache; the device's memory bandwidth runs those at full speed."""
    return False


def tiled_columns_pay(kernel: Pair, stride: Pair, dtype: Any) -> bool:
    """Never on the GPU: a convolution's input is its own array there, and im2col a kernel
    launch (the CPU's layer-to-columns writes, :func:`dtrain.nn.cpu_kernels.tiled_columns_pay`,
    have no CUDA kernels)."""
    return False


def direct_weight_grad_pays(out_channels: int, rows: int) -> bool:
    """Never on the GPU (no convolution runs direct there; see :func:`direct_conv_pays`)."""
    return False


def winograd_tile(out_channels: int, in_channels: int, kernel: Pair, stride: Pair, out_hw: Pair,
                  dtype: Any) -> int:
    """0: on the GPU every convolution runs as im2col + cuBLAS (the CPU's Winograd
    transforms, :func:`dtrain.nn.cpu_kernels.winograd_tile`, have no CUDA kernels)."""
    return 0


# The window geometry every kernel takes after its arrays.
_GEOMETRY = ("int64 C, int64 H, int64 W, int64 N, int64 KH, int64 KW, int64 SH, int64 SW, "
             "int64 PH, int64 PW, int64 OH, int64 OW")
# The block of columns im2col and col2im work on: output pixels P0 .. P0+P-1 (row-major over (OH, OW)).
_BLOCK = "int64 P0, int64 P"

def _unravel(*axes: tuple[str, str]) -> str:
    """C code splitting thread ``i``'s flat index into named indices, fastest axis first.

    ``axes`` are ``(index name, size name)`` pairs from the fastest-varying axis of a
    C-contiguous array to the slowest; the slowest takes what is left.
    """
    lines = ["long long t = i;"]
    for index, size in axes[:-1]:
        lines.append(f"const long long {index} = t % {size}; t /= {size};")
    lines.append(f"const long long {axes[-1][0]} = t;")
    return "\n".join(lines) + "\n"


# Thread i's (c, oh, ow, b) in a (C, OH, OW, N) array, and (c, h, w, b) in a (C, H, W, N)
# one. The sample is b: n and i are CuPy's names.
_OUTPUT_INDEX = _unravel(("b", "N"), ("ow", "OW"), ("oh", "OH"), ("c", "C"))
_INPUT_INDEX = _unravel(("b", "N"), ("w", "W"), ("h", "H"), ("c", "C"))

# For input (h, w): the outputs (oh, ow) whose window has it at offset (ki, kj); runs BODY for
# each, offsets in increasing order. Output oh covers padded rows oh*SH .. oh*SH+KH-1.
_FOR_EACH_COVERING_OUTPUT = """
    for (long long ki = 0; ki < KH; ++ki) {{
        const long long hh = h + PH - ki;
        if (hh < 0 || hh % SH != 0 || hh / SH >= OH) continue;
        const long long oh = hh / SH;
        for (long long kj = 0; kj < KW; ++kj) {{
            const long long ww = w + PW - kj;
            if (ww < 0 || ww % SW != 0 || ww / SW >= OW) continue;
            const long long ow = ww / SW;
            {body}
        }}
    }}
"""


# The accumulator type A of every kernel, defined from the arrays' type T in the kernel's
# preamble (CuPy emits the typedef of T before the preamble): T itself for float32 and
# float64, so results match the CPU path, and float32 for float16, which accumulates in
# float32 like cuDNN. A type placeholder must be fixed by an array argument: CuPy cannot
# infer one from a scalar, so A is not a kernel parameter.
ACCUMULATOR_PREAMBLE = """
template <typename X> struct dtrain_accumulator { typedef X type; };
template <> struct dtrain_accumulator<float16> { typedef float type; };
typedef dtrain_accumulator<T>::type A;
"""

# name -> (inputs, outputs, body): CuPy ElementwiseKernel sources, kept as plain strings so
# that tests can also compile the bodies on a machine without CUDA.
KERNELS: dict[str, tuple[str, str, str]] = {
    # cols row (c, ki, kj), column (p, b) for output pixel P0 + p: the input under that
    # offset, 0 in the padding.
    "im2col": (f"raw T x, {_GEOMETRY}, {_BLOCK}", "T col",
               _unravel(("b", "N"), ("p", "P"), ("kj", "KW"), ("ki", "KH"), ("c", "C")) + """
        const long long oh = (P0 + p) / OW;
        const long long ow = (P0 + p) % OW;
        const long long h = oh * SH + ki - PH;
        const long long w = ow * SW + kj - PW;
        col = (h >= 0 && h < H && w >= 0 && w < W) ? x[((c * H + h) * W + w) * N + b] : (T)0;
    """),
    # Adds the block's columns into img: each input sums the outputs of the block whose
    # window holds it, offsets in increasing order. FRESH: img counts as zeros. GATED: then
    # img is zeroed where gate <= 0 (the backward of a ReLU whose output gate was).
    "col2im": (f"raw T col, raw T gate, {_GEOMETRY}, {_BLOCK}, int64 FRESH, int64 GATED", "T img", _INPUT_INDEX + """
        A acc = (A)0;
    """ + _FOR_EACH_COVERING_OUTPUT.format(body="""
        const long long p = oh * OW + ow - P0;
        if (p >= 0 && p < P) acc += (A)col[(((c * KH + ki) * KW + kj) * P + p) * N + b];
    """) + """
        const T sum = (T)((FRESH ? (A)0 : (A)img) + acc);
        img = (GATED && gate[i] <= (T)0) ? (T)0 : sum;
    """),
    # The first maximum in offset order wins (strict >), like the CPU kernels and PyTorch;
    # padding never wins (it is -inf there).
    # GATED: the input is a ReLU's output; a window whose maximum is <= 0 gets no winner
    # (offset KH*KW), so backward passes it no gradient.
    "max_pool_forward": (f"raw T x, {_GEOMETRY}, int64 GATED", "T y, U arg", _OUTPUT_INDEX + """
        bool found = false;
        A best = (A)0;
        U at = 0;
        for (long long ki = 0; ki < KH; ++ki) {
            const long long h = oh * SH + ki - PH;
            if (h < 0 || h >= H) continue;
            for (long long kj = 0; kj < KW; ++kj) {
                const long long w = ow * SW + kj - PW;
                if (w < 0 || w >= W) continue;
                const A v = (A)x[((c * H + h) * W + w) * N + b];
                if (!found || v > best) {
                    best = v;
                    at = (U)(ki * KW + kj);
                    found = true;
                }
            }
        }
        y = (T)best;
        arg = (GATED && best <= (A)0) ? (U)(KH * KW) : at;
    """),
    "max_pool_backward": (f"raw T gy, raw U arg, {_GEOMETRY}", "T gx", _INPUT_INDEX + """
        A acc = (A)0;
    """ + _FOR_EACH_COVERING_OUTPUT.format(body="""
        const long long o = ((c * OH + oh) * OW + ow) * N + b;
        if (arg[o] == ki * KW + kj) acc += (A)gy[o];
    """) + """
        gx = (T)acc;
    """),
    # Padded zeros count towards the mean (count_include_pad): always divide by KH*KW.
    "avg_pool_forward": (f"raw T x, {_GEOMETRY}", "T y", _OUTPUT_INDEX + """
        A acc = (A)0;
        for (long long ki = 0; ki < KH; ++ki) {
            const long long h = oh * SH + ki - PH;
            if (h < 0 || h >= H) continue;
            for (long long kj = 0; kj < KW; ++kj) {
                const long long w = ow * SW + kj - PW;
                if (w < 0 || w >= W) continue;
                acc += (A)x[((c * H + h) * W + w) * N + b];
            }
        }
        y = (T)(acc * (A)(1.0 / (double)(KH * KW)));
    """),
    "avg_pool_backward": (f"raw T gy, {_GEOMETRY}", "T gx", _INPUT_INDEX + """
        const A share = (A)(1.0 / (double)(KH * KW));
        A acc = (A)0;
    """ + _FOR_EACH_COVERING_OUTPUT.format(body="""
        acc += (A)gy[((c * OH + oh) * OW + ow) * N + b] * share;
    """) + """
        gx = (T)acc;
    """),
    # A convolution's output y (F, P) in place: y + bias[f] when BIASED, then with RELU
    # maximum(., 0) as the CPU kernels take it (NaN stays NaN, -0.0 becomes 0).
    "bias_relu": ("raw T bias, int64 P, int64 BIASED, int64 RELU", "T y", """
        const T v = BIASED ? (T)(y + bias[i / P]) : y;
        y = (RELU && v <= (T)0) ? (T)0 : v;
    """),
    # ReLU's backward from its output y, in place: PyTorch's rule (a NaN output passes the
    # gradient on). Plain (not raw) arrays: any memory layout, as long as the two match.
    "relu_backward": ("T y", "T grad", "if (y <= (T)0) grad = (T)0;"),
}


def build_kernels(cupy: Any) -> dict[str, Any]:
    """Every kernel of :data:`KERNELS` as a ``cupy.ElementwiseKernel`` (compiled on first call)."""
    return {name: cupy.ElementwiseKernel(inputs, outputs, body, f"dtrain_{name}", preamble=ACCUMULATOR_PREAMBLE)
            for name, (inputs, outputs, body) in KERNELS.items()}


@functools.cache
def _kernels() -> dict[str, Any]:
    import cupy

    return build_kernels(cupy)


def _flat(a: Array) -> Array:
    """The 1-D view of a C-contiguous array, as the kernels index raw arguments (never a copy)."""
    if not a.flags.c_contiguous:
        raise ValueError(f"cuda_kernels: expected a C-contiguous array, got strides {a.strides} for shape {a.shape}")
    return a.reshape(-1)


def _geometry(input_chwn: tuple[int, ...], kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair) -> tuple[int, ...]:
    c, h, w, n = input_chwn
    return (c, h, w, n, *kernel, *stride, *padding, *out_hw)


def im2col(x: Array, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair, cols: Array, first: int = 0) -> Array:
    """Fill ``cols`` (C*kh*kw, P*N) with the columns of output pixels ``first .. first+P-1``
    (row-major over (OH, OW)) of the C-contiguous batch-last input ``x`` (C, H, W, N)."""
    pixels = cols.shape[1] // x.shape[3]
    _kernels()["im2col"](_flat(x), *_geometry(x.shape, kernel, stride, padding, out_hw), first, pixels, _flat(cols))
    return cols


def col2im_add(cols: Array, img: Array, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair,
               first: int = 0, fresh: bool = False, gate: Array | None = None) -> Array:
    """The adjoint of :func:`im2col`: add the columns (C*kh*kw, P*N) of output pixels
    ``first ..`` into ``img`` (C, H, W, N), C-contiguous, each input in kernel-offset order;
    ``fresh`` and ``gate`` as in :func:`dtrain.nn.cpu_kernels.col2im_add`."""
    pixels = cols.shape[1] // img.shape[3]
    gating = _flat(img if gate is None else gate)
    _kernels()["col2im"](_flat(cols), gating, *_geometry(img.shape, kernel, stride, padding, out_hw), first, pixels,
                         int(fresh), int(gate is not None), _flat(img))
    return img


def max_pool_forward(x: Array, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair, argmax: Array,
                     gated: bool = False) -> Array:
    """(C, H, W, N) -> new (C, OH, OW, N) window maxima; ``argmax`` (C, OH, OW, N) gets each
    winner's offset; ``gated`` as in :func:`dtrain.nn.cpu_kernels.max_pool_forward`."""
    import cupy

    y = cupy.empty(argmax.shape, dtype=x.dtype)
    geometry = _geometry(x.shape, kernel, stride, padding, out_hw)
    _kernels()["max_pool_forward"](_flat(x), *geometry, int(gated), y, argmax)
    return y


def max_pool_backward(grad: Array, argmax: Array, input_chwn: tuple[int, ...], kernel: Pair, stride: Pair,
                      padding: Pair) -> Array:
    """(C, OH, OW, N) gradient -> new (C, H, W, N): each output's gradient to its window's winner."""
    import cupy

    gx = cupy.empty(input_chwn, dtype=grad.dtype)
    out_hw = grad.shape[1:3]
    geometry = _geometry(input_chwn, kernel, stride, padding, out_hw)
    _kernels()["max_pool_backward"](_flat(grad), _flat(argmax), *geometry, gx)
    return gx


def avg_pool_forward(x: Array, kernel: Pair, stride: Pair, padding: Pair, out_hw: Pair) -> Array:
    """(C, H, W, N) -> new (C, OH, OW, N) window means (padding counts as zeros)."""
    import cupy

    y = cupy.empty((x.shape[0], *out_hw, x.shape[3]), dtype=x.dtype)
    _kernels()["avg_pool_forward"](_flat(x), *_geometry(x.shape, kernel, stride, padding, out_hw), y)
    return y


def avg_pool_backward(grad: Array, input_chwn: tuple[int, ...], kernel: Pair, stride: Pair, padding: Pair) -> Array:
    """(C, OH, OW, N) gradient -> new (C, H, W, N): each window input gets grad / (kh*kw)."""
    import cupy

    gx = cupy.empty(input_chwn, dtype=grad.dtype)
    geometry = _geometry(input_chwn, kernel, stride, padding, grad.shape[1:3])
    _kernels()["avg_pool_backward"](_flat(grad), *geometry, gx)
    return gx


def bias_relu(y: Array, bias: Array | None, relu: bool) -> Array:
    """In place on ``y`` (F, P), C-contiguous: add ``bias[f]`` (F,) to row f when given, then
    with ``relu`` take ``maximum(., 0)``."""
    flat = _flat(y)
    _kernels()["bias_relu"](flat if bias is None else bias, y.shape[1], int(bias is not None), int(relu), flat)
    return y


def relu_backward(grad: Array, y: Array) -> Array:
    """Zero ``grad`` in place where ReLU's output ``y`` (same shape) is <= 0."""
    _kernels()["relu_backward"](y, grad)
    return grad
