"""Counter-based random numbers: a pure function of integer keys, no generator state.

``uniform(seed, salt, step, sample_ids, num_features)`` hashes every key tuple
``(seed, salt, step, sample_id, feature)`` with the SplitMix64 finalizer to a float in
[0, 1). Because the result depends only on the keys, the same sample gets the same
numbers on CPU and GPU (the arithmetic is plain wrapping uint64 integer math, identical
in NumPy and CuPy) and whichever rank or micro-batch it lands in.
"""
from __future__ import annotations

import numpy as np

from dtrain.backend import get_array_module
from dtrain.nn.module import Array

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, SplitMix64's increment
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def mix64(z: Array) -> Array:
    """SplitMix64 finalizer, elementwise on a uint64 array (a bijection of 2**64 values)."""
    xp = get_array_module(z)
    u = xp.uint64  # uint64 scalars keep every operation in uint64 under NumPy's and CuPy's rules
    z = (z ^ (z >> u(30))) * u(_MUL1)
    z = (z ^ (z >> u(27))) * u(_MUL2)
    return z ^ (z >> u(31))


def absorb(h: Array, v: Array) -> Array:
    """Fold key ``v`` into hash state ``h`` (uint64 arrays, broadcast against each other)."""
    u = get_array_module(h).uint64
    return mix64(h + (v + u(1)) * u(_GOLDEN))


def _key(value: int) -> np.ndarray:
    """A Python int (mod 2**64) as a one-element uint64 host array (not 0-d: NumPy would drop to scalars)."""
    return np.array([int(value) & _MASK64], dtype=np.uint64)


def hash_bits(seed: int, salt: int, step: int, sample_ids: Array, num_features: int) -> Array:
    """(N, num_features) uint64 hashes of ``(seed, salt, step, sample_ids[n], f)``.

    ``sample_ids`` is a 1-D integer array (NumPy or CuPy; the result lives on the same
    device). Negative keys are taken modulo 2**64.
    """
    xp = get_array_module(sample_ids)
    prefix = absorb(absorb(mix64(_key(seed)), _key(salt)), _key(step))  # on the host, then one copy
    h = absorb(xp.asarray(prefix), sample_ids.astype(xp.uint64)[:, None])
    return absorb(h, xp.arange(num_features, dtype=xp.uint64)[None, :])


def uniform(seed: int, salt: int, step: int, sample_ids: Array, num_features: int) -> Array:
    """(N, num_features) float64 uniforms in [0, 1) from the top 53 bits of :func:`hash_bits`."""
    xp = get_array_module(sample_ids)
    bits = hash_bits(seed, salt, step, sample_ids, num_features) >> xp.uint64(11)
    return bits.astype(xp.float64) * (1.0 / (1 << 53))
