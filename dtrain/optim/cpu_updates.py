"""Fused optimizer updates on the CPU (Numba): one pass over each block of the flat buffers.

The optimizers' array-operation chains (``_update`` in :mod:`dtrain.optim.sgd` and
:mod:`dtrain.optim.adam`, which the GPU runs) take a dozen NumPy calls per block, each
streaming its operands through the cache and paying a call; here each element is read
once, updated in registers and written once. The arithmetic is the chains', operation for
operation and in the arrays' dtype (the scalars come in that dtype, as NumPy casts a Python
float against a float32 array), so the results are the same bits: compiled without
fast-math, the compiler neither reorders nor contracts into fused multiply-adds, which also
keeps the vectorized loop and its scalar remainder rounding alike, so nothing depends on
where a block starts. ``error_model="numpy"`` lets a division by zero give inf instead of
raising, which spares the check that keeps a loop from vectorizing.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from dtrain.nn.module import Array

# The dtypes the kernels compile for; others (float16) take the array-operation chain.
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@njit(nogil=True, cache=True, error_model="numpy")
def _sgd(p, g, buf, lr, momentum, undamped, weight_decay, nesterov, first):  # pragma: no cover (compiled)
    for i in range(p.shape[0]):
        d = g[i] if weight_decay == 0 else p[i] * weight_decay + g[i]
        direction = d
        if momentum != 0:
            if first:
                b = d
            elif undamped != 1:
                b = buf[i] * momentum + d * undamped
            else:
                b = buf[i] * momentum + d
            buf[i] = b
            direction = b * momentum + d if nesterov else b
        p[i] = p[i] - direction * lr


@njit(nogil=True, cache=True, error_model="numpy")
def _adam(p, g, m, v, step_size, beta1_rest, beta2, beta2_rest, bias2_root, eps, weight_decay,
          shrink):  # pragma: no cover (compiled)
    for i in range(p.shape[0]):
        param = p[i] if shrink == 1 else p[i] * shrink
        d = g[i] if weight_decay == 0 else param * weight_decay + g[i]
        mean = m[i] + (d - m[i]) * beta1_rest
        square = v[i] * beta2 + d * d * beta2_rest
        m[i] = mean
        v[i] = square
        p[i] = param - mean / (math.sqrt(square) / bias2_root + eps) * step_size


def sgd(p: Array, g: Array, buf: Array, lr: float, momentum: float, dampening: float, weight_decay: float,
        nesterov: bool, first: bool) -> None:
    """``torch.optim.SGD``'s step on matching 1-D blocks: parameters ``p`` and momentum buffer
    ``buf`` (unused without momentum) in place, from gradient ``g`` (see
    :class:`dtrain.optim.sgd.SGD`); ``first`` on the first step, which sets the buffer to the
    gradient."""
    t = p.dtype.type
    _sgd(p, g, buf, t(lr), t(momentum), t(1.0 - dampening), t(weight_decay), nesterov, first)


def adam(p: Array, g: Array, m: Array, v: Array, lr: float, betas: tuple[float, float], eps: float,
         weight_decay: float, decoupled: bool, step: int) -> None:
    """``torch.optim.Adam`` (``torch.optim.AdamW`` when ``decoupled``) at step ``step`` on
    matching 1-D blocks: parameters ``p`` and moment estimates ``m``, ``v`` in place, from
    gradient ``g`` (see :class:`dtrain.optim.adam.Adam`)."""
    t = p.dtype.type
    beta1, beta2 = betas
    coupled = 0.0 if decoupled else weight_decay
    shrink = 1.0 - lr * weight_decay if decoupled and weight_decay != 0 else 1.0
    _adam(p, g, m, v, t(lr / (1.0 - beta1**step)), t(1.0 - beta1), t(beta2), t(1.0 - beta2),
          t(math.sqrt(1.0 - beta2**step)), t(eps), t(coupled), t(shrink))
