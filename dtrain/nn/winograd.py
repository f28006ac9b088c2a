"""Winograd's minimal filtering F(m x m, r x r): a stride-1 convolution with fewer multiplications.

One output tile of m x m pixels of an r x r correlation needs an input tile d of alpha x
alpha pixels, alpha = m + r - 1. Winograd's algorithm computes it as::

    Y = A^T [ (G w G^T) * (B^T d B) ] A        (* elementwise, summed over input channels)

with A^T (m x alpha), G (alpha x r) and B^T (alpha x alpha) from :func:`transforms`. The
elementwise product summed over channels is, for each of the alpha^2 positions xi of the
transformed tile, one matrix product over the channels::

    M[xi] (F, T*N) = U[xi] (F, C) @ V[xi] (C, T*N)

where U holds the transformed filters and V the transformed input tiles (T tiles, N
samples, batch fastest). These alpha^2 GEMMs do alpha^2 multiply-adds per tile where the
direct convolution does m^2 r^2 (F(3x3, 3x3): 25 against 81). Backward runs the adjoints:
``dM = A dY A^T`` per output tile; the weight gradient ``dU[xi] = dM[xi] @ V[xi]^T``, then
``G^T dU G``; the input gradient ``dV[xi] = U[xi]^T @ dM[xi]``, then ``B dV B^T`` added into
the overlapping input tiles.

The transforms are built exactly (rational arithmetic) by interpolation at the points 0, 1,
-1, 2, -2, 1/2, -1/2 (as many as alpha - 1 needs) and infinity, as in Lavin and Gray, "Fast
Algorithms for Convolutional Neural Networks" (2016); each row of B^T is scaled to integers
and G takes the reciprocal, so that the input transform, which runs on every activation,
multiplies by small integers only.

The tiles go in blocks of at most ``COLUMN_BLOCK_BYTES`` (of the kernel set) of V or of M, as
im2col's columns do (at least one tile: one tile of a huge batch may exceed it): one
thread-shared buffer for V (the one im2col uses for columns) and one for M, so that the
scratch memory stays that of a block whatever the layer's size. Backward transforms the
input again instead of keeping V from forward. The CPU kernel set
(:mod:`dtrain.nn.cpu_kernels`) runs the transforms and decides which layers take this path
(``winograd_tile``); all GEMMs go through :func:`dtrain.nn.gemm.matmul`.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction
from types import ModuleType

import numpy as np

from dtrain.backend import get_array_module
from dtrain.nn.gemm import matmul
from dtrain.nn.im2col import pixel_blocks
from dtrain.nn.module import Array
from dtrain.nn.workspace import shared_scratch

Pair = tuple[int, int]

POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2), Fraction(1, 2), Fraction(-1, 2))

def _powers(k: int, alpha: int) -> list[list[Fraction]]:
    """(alpha, k): row j the powers 0 .. k-1 of point j; the last row is the point at
    infinity, which keeps only the leading coefficient."""
    rows = [[p ** i for i in range(k)] for p in POINTS[:alpha - 1]]
    return rows + [[Fraction(0)] * (k - 1) + [Fraction(1)]]


def _inverse(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
    """The exact inverse of a square, invertible rational matrix (Gauss-Jordan)."""
    size = len(matrix)
    rows = [row[:] + [Fraction(int(i == j)) for j in range(size)] for i, row in enumerate(matrix)]
    for col in range(size):
        pivot = next(i for i in range(col, size) if rows[i][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [value / rows[col][col] for value in rows[col]]
        for i in range(size):
            if i != col and rows[i][col] != 0:
                factor = rows[i][col]
                rows[i] = [a - factor * b for a, b in zip(rows[i], rows[col])]
    return [row[size:] for row in rows]


@functools.cache
def transforms(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A^T, G, B^T)`` of F(m, r) as float64 arrays of shapes (m, alpha), (alpha, r) and
    (alpha, alpha), alpha = m + r - 1: ``A^T @ ((G @ g) * (B^T @ d))`` is the correlation
    ``y[i] = sum_k g[k] d[i + k]`` of d (alpha,) with g (r,), for i < m.

    Why: the linear convolution of polynomials g (degree r-1) and h (degree m-1) is
    evaluated at alpha points, multiplied pointwise and interpolated back: s = P ((Vg g) *
    (Vh h)), with Vg, Vh the points' powers and P the inverse of the alpha x alpha ones.
    That is a matrix C(g) h; correlation is its transpose, ``C(g)^T d = Vh^T ((Vg g) * (P^T
    d))``: A^T = Vh^T, G = Vg, B^T = P^T.
    """
    if m < 1 or r < 1 or m + r - 1 > len(POINTS) + 1:
        raise ValueError(f"winograd: F({m}, {r}) needs {m + r - 2} interpolation points, {len(POINTS)} are defined")
    alpha = m + r - 1
    at = [list(col) for col in zip(*_powers(m, alpha))]
    g = _powers(r, alpha)
    bt = [list(col) for col in zip(*_inverse(_powers(alpha, alpha)))]
    for j, row in enumerate(bt):  # scale row j of B^T to integers, row j of G by the reciprocal
        scale = math.lcm(*(value.denominator for value in row))
        bt[j] = [value * scale for value in row]
        g[j] = [value / scale for value in g[j]]
    return tuple(np.array([[float(v) for v in row] for row in mat]) for mat in (at, g, bt))


class _Plan:
    """What both passes of one layer call need: the transforms in the arrays' dtype, the
    alpha^2 transformed positions, the tile grid's width and the blocks of tiles."""

    def __init__(self, kernels: ModuleType, x: Array, weight: Array, out_hw: Pair, m: int) -> None:
        xp = get_array_module(x)
        f, c, r = weight.shape[0], x.shape[0], weight.shape[2]
        self.at, self.g, self.bt = (xp.asarray(mat, dtype=x.dtype) for mat in transforms(m, r))
        self.area = (m + r - 1) ** 2
        self.tiles_w = -(-out_hw[1] // m)
        tiles = -(-out_hw[0] // m) * self.tiles_w
        per_tile = self.area * max(c, f) * x.shape[3] * x.itemsize
        self.blocks = list(pixel_blocks(tiles, per_tile, kernels.COLUMN_BLOCK_BYTES))

    def scratch(self, name: str, rows: int, columns: int, like: Array) -> Array:
        """This thread's shared buffer ``name`` as an (alpha^2, rows, columns) array."""
        size = self.area * rows * columns
        return shared_scratch(name, size, like.dtype, get_array_module(like)).reshape(self.area, rows, columns)


def forward(kernels: ModuleType, x: Array, weight: Array, bias: Array | None, padding: Pair, m: int,
            y: Array, relu: bool = False) -> None:
    """Fill ``y`` (F, OH, OW, N) with the stride-1 cross-correlation of the batch-last input
    ``x`` (C, H, W, N) with ``weight`` (F, C, r, r), plus ``bias`` (F,) when given, by
    F(m x m, r x r), and with ``relu`` its ``maximum(., 0)``; C-contiguous float32 or
    float64 arrays."""
    f, oh, ow, n = y.shape
    c = x.shape[0]
    plan = _Plan(kernels, x, weight, (oh, ow), m)
    u = kernels.winograd_weight(weight, plan.g, plan.scratch("winograd_u", f, c, x))
    shift = bias if bias is not None else get_array_module(x).zeros(f, x.dtype)
    for first, count in plan.blocks:
        v = plan.scratch("columns", c, count * n, x)
        mm = plan.scratch("winograd_m", f, count * n, x)
        kernels.winograd_input(x, plan.bt, m, padding, plan.tiles_w, first, v)
        for xi in range(plan.area):
            matmul(u[xi], v[xi], out=mm[xi])
        kernels.winograd_output(mm, plan.at, shift, m, plan.tiles_w, first, y, relu)


def backward(kernels: ModuleType, x: Array, grad: Array, weight: Array, padding: Pair, m: int,
             weight_grad: Array, grad_in: Array | None, relu_before: bool = False) -> None:
    """The gradients of :func:`forward`: write the weight gradient (F, C, r, r) into
    ``weight_grad`` from the input ``x`` (C, H, W, N) and the output gradient ``grad`` (F,
    OH, OW, N); write the input gradient into ``grad_in`` (C, H, W, N; its content is
    ignored) unless it is None, with ``relu_before`` zeroed where ``x`` <= 0 (the backward
    of the ReLU whose output ``x`` was)."""
    f, oh, ow, n = grad.shape
    c = x.shape[0]
    plan = _Plan(kernels, x, weight, (oh, ow), m)
    u = None if grad_in is None else kernels.winograd_weight(weight, plan.g, plan.scratch("winograd_u", f, c, x))
    du = plan.scratch("winograd_du", f, c, x)
    for index, (first, count) in enumerate(plan.blocks):
        v = plan.scratch("columns", c, count * n, x)
        dm = plan.scratch("winograd_m", f, count * n, x)
        kernels.winograd_input(x, plan.bt, m, padding, plan.tiles_w, first, v)
        kernels.winograd_output_grad(grad, plan.at, m, plan.tiles_w, first, dm)
        for xi in range(plan.area):
            if index == 0:
                matmul(dm[xi], v[xi].T, out=du[xi])
            else:  # BLAS cannot accumulate through NumPy: one product, then an add
                partial = shared_scratch("winograd_du_block", f * c, x.dtype, get_array_module(x)).reshape(f, c)
                matmul(dm[xi], v[xi].T, out=partial)
                du[xi] += partial
            if u is not None:
                matmul(u[xi].T, dm[xi], out=v[xi])  # V[xi] is used up: it takes dV[xi]
        if grad_in is not None:
            last = index == len(plan.blocks) - 1
            kernels.winograd_input_grad_add(v, plan.bt, m, padding, plan.tiles_w, first, grad_in, fresh=index == 0,
                                            gate=x if relu_before and last else None)
    kernels.winograd_weight_grad(du, plan.g, weight_grad)
