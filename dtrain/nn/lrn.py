"""Local response normalization across channels (PyTorch's ``nn.LocalResponseNorm``).

``y[c] = x[c] / (k + alpha / size * sum_{j in W(c)} x[j]**2) ** beta`` where the window
``W(c)`` runs from ``c - size // 2`` to ``c + (size - 1) // 2`` (channels outside
``0 .. C-1`` count as zero), exactly PyTorch's formula, AlexNet's normalization.
"""
from __future__ import annotations

from dtrain.backend import get_array_module
from dtrain.checks import check_int
from dtrain.nn.module import Array, Module, Shape


def channel_window_sum(v: Array, before: int, after: int) -> Array:
    """``out[:, c] = sum(v[:, c - before : c + after + 1])`` over axis 1, zero outside the edges.

    Loops over the ``before + after + 1`` window offsets, each a whole-array slice add.
    """
    xp = get_array_module(v)
    channels = v.shape[1]
    out = xp.zeros_like(v)
    for offset in range(-before, after + 1):
        lo, hi = max(0, -offset), min(channels, channels - offset)
        if lo < hi:
            out[:, lo:hi] += v[:, lo + offset : hi + offset]
    return out


class LocalResponseNorm(Module):
    """Normalize each channel by the energy of its ``size`` neighbours; input (N, C, ...)."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        check_int(size, "LocalResponseNorm: size", 1)
        if not k > 0:
            raise ValueError(f"LocalResponseNorm: k must be > 0 so the denominator stays positive, got {k!r}")
        self.size = size
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.k = float(k)
        self._cache: tuple[Array, Array, Array] | None = None

    def forward(self, x: Array) -> Array:
        """(N, C, ...) -> same shape."""
        if getattr(x, "ndim", 0) < 3:
            raise ValueError(
                f"{self!r} expects input of shape (N, C, ...) with at least 3 dims, got shape "
                f"{tuple(getattr(x, 'shape', ()))}"
            )
        energy = channel_window_sum(x * x, self.size // 2, (self.size - 1) // 2)
        denom = self.k + (self.alpha / self.size) * energy
        scale = denom ** (-self.beta)
        self._cache = (x, scale, denom)
        return x * scale

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array:
        """Gradient w.r.t. the input, same shape."""
        # dy[c]/dx[j] = [c == j] s[c] - (2 alpha beta / size) x[j] x[c] s[c] / d[c] (s = d^-beta) for
        # every c whose window holds j; those c form the mirrored window, hence before/after swapped.
        if self._cache is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        x, scale, denom = self._cache
        spread = channel_window_sum(grad_out * x * scale / denom, (self.size - 1) // 2, self.size // 2)
        return grad_out * scale - (2 * self.alpha * self.beta / self.size) * x * spread

    def output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) < 2:
            raise ValueError(f"{self!r} expects a per-sample shape (C, ...) with at least 2 dims, got {tuple(input_shape)}")
        return tuple(input_shape)

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"
