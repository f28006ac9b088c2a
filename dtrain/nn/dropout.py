"""Inverted dropout whose mask is a pure function of (seed, salt, step, sample, feature).

The mask comes from :func:`dtrain.nn.rng.uniform`, not from a stateful generator, so a
sample is dropped the same way on CPU and GPU and whichever rank processes it: the
data-parallel trainer calls :meth:`Dropout.set_batch_context` with the global step and
the global ids of the samples in the local batch. Without a context, ``step`` counts
this layer's training forward calls and the ids are ``0 .. N-1``.
"""
from __future__ import annotations

from dtrain.backend import get_array_module
from dtrain.checks import check_int, check_real
from dtrain.nn.module import Array, Module
from dtrain.nn.rng import uniform


class Dropout(Module):
    """Zero each element with probability ``p`` in training, scale survivors by 1/(1-p).

    ``salt`` tells Dropout layers of one model apart (give each its position in the
    model); ``seed`` is the run's seed. Identity in eval mode. Any input shape (N, ...):
    the features of a sample are its elements in C order.
    """

    def __init__(self, p: float = 0.5, seed: int = 0, salt: int = 0) -> None:
        super().__init__()
        check_real(p, "Dropout: p", 0.0, 1.0, high_open=True)
        check_int(seed, "Dropout: seed")
        check_int(salt, "Dropout: salt")
        self.p = float(p)
        self.seed = seed
        self.salt = salt
        self._context: tuple[int, Array | None] | None = None
        self._forward_calls = 0
        self._mask: Array | None = None

    def set_batch_context(self, step: int, sample_ids: Array | None) -> None:
        """Use ``step`` and these global sample ids (length N, or None for 0..N-1) from now on."""
        self._context = (int(step), sample_ids)

    def _keys(self, xp, n: int) -> tuple[int, Array]:
        if self._context is None:
            step, ids = self._forward_calls, None
            self._forward_calls += 1
        else:
            step, ids = self._context
        if ids is None:
            return step, xp.arange(n, dtype=xp.int64)
        ids = xp.asarray(ids)
        if ids.ndim != 1 or ids.shape[0] != n or ids.dtype.kind not in "iu":
            raise ValueError(
                f"{self!r}: the batch context's sample_ids must be a 1-D integer array with one id per "
                f"sample ({n}), got {ids.dtype} array of shape {tuple(ids.shape)}"
            )
        return step, ids

    def forward(self, x: Array) -> Array:
        """Same shape out; in training ``x * mask / (1 - p)``."""
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        xp = get_array_module(x)
        n = x.shape[0]
        step, ids = self._keys(xp, n)
        keep = uniform(self.seed, self.salt, step, ids, x.size // n) >= self.p
        self._mask = keep.reshape(x.shape).astype(x.dtype) * (1.0 / (1.0 - self.p))
        return x * self._mask

    def backward(self, grad_out: Array, input_grad: bool = True) -> Array:
        return grad_out if self._mask is None else grad_out * self._mask

    def extra_repr(self) -> str:
        return f"p={self.p}, seed={self.seed}, salt={self.salt}"
