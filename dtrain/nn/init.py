"""Weight initializers (He/Kaiming and Glorot/Xavier), drawn on the host with NumPy.

Initial weights are drawn with a ``numpy.random.Generator`` so a model built with the
same seed is identical on CPU and GPU and on every rank; the model is moved to the
device afterwards. Fans follow PyTorch: for a weight of shape (out, in, *kernel),
``fan_in = in * prod(kernel)`` and ``fan_out = out * prod(kernel)``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Initializer = Callable[..., np.ndarray]  # (rng, shape, gain=..., rows=None) -> array


def _size(shape: tuple[int, ...], rows: int | None) -> tuple[int, ...]:
    """The shape of the draw: all of ``shape``, or its first ``rows`` rows (the scale still
    comes from the whole shape's fans)."""
    return shape if rows is None else (rows, *shape[1:])


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear (out, in) or Conv (out, in, kh, kw) weight."""
    if len(shape) < 2:
        raise ValueError(f"fan computation needs a weight with at least 2 dims, got shape {shape}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def kaiming_normal(rng: np.random.Generator, shape: tuple[int, ...], gain: float = math.sqrt(2.0),
                   rows: int | None = None) -> np.ndarray:
    """N(0, gain^2 / fan_in); the default gain suits ReLU."""
    fan_in, _ = fans(shape)
    return rng.normal(0.0, gain / math.sqrt(fan_in), size=_size(shape, rows))


def kaiming_uniform(rng: np.random.Generator, shape: tuple[int, ...], gain: float = math.sqrt(2.0),
                    rows: int | None = None) -> np.ndarray:
    """U(-b, b) with b = gain * sqrt(3 / fan_in)."""
    fan_in, _ = fans(shape)
    bound = gain * math.sqrt(3.0 / fan_in)
    return rng.uniform(-bound, bound, size=_size(shape, rows))


def xavier_normal(rng: np.random.Generator, shape: tuple[int, ...], gain: float = 1.0,
                  rows: int | None = None) -> np.ndarray:
    """N(0, gain^2 * 2 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(shape)
    return rng.normal(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), size=_size(shape, rows))


def xavier_uniform(rng: np.random.Generator, shape: tuple[int, ...], gain: float = 1.0,
                   rows: int | None = None) -> np.ndarray:
    """U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=_size(shape, rows))


def torch_default(rng: np.random.Generator, shape: tuple[int, ...], gain: float = 1.0,
                  rows: int | None = None) -> np.ndarray:
    """PyTorch's default for Conv/Linear weights: U(-b, b) with b = gain / sqrt(fan_in).

    (``kaiming_uniform_`` with ``a=sqrt(5)``.) Smaller than He init by sqrt(6): shallow
    nets such as LeNet start with well-scaled logits and train faster with it.
    """
    fan_in, _ = fans(shape)
    bound = gain / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=_size(shape, rows))


INITIALIZERS: dict[str, Initializer] = {
    "torch_default": torch_default,
    "kaiming_normal": kaiming_normal,
    "kaiming_uniform": kaiming_uniform,
    "xavier_normal": xavier_normal,
    "xavier_uniform": xavier_uniform,
}


def initialize(name: str, rng: np.random.Generator, shape: tuple[int, ...], layer: str,
               dtype: np.dtype | type = np.float64) -> np.ndarray:
    """Draw a weight with the named initializer, as a ``dtype`` array; unknown names list
    the valid ones. NumPy draws in float64; a float32 weight is drawn a few rows at a time
    and cast piece by piece, the same values as one draw of the whole (a ``Generator``'s
    stream does not depend on how it is cut), without the whole weight in float64 (134 MB
    for a 4096 x 4096 layer, kept by the allocator for the rest of the run)."""
    try:
        fn = INITIALIZERS[name]
    except KeyError:
        raise ValueError(f"{layer}: unknown init {name!r}; choose one of {sorted(INITIALIZERS)}") from None
    out = np.empty(shape, dtype)
    rows = max(1, _PIECE_VALUES // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        piece = out[start:start + rows]
        piece[...] = fn(rng, shape, rows=len(piece))
    return out


_PIECE_VALUES = 1 << 16  # values drawn at a time by initialize


def bias_uniform(rng: np.random.Generator, fan_in: int, size: int) -> np.ndarray:
    """PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=(size,))
