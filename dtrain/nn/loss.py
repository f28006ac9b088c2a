"""Softmax cross-entropy loss on logits, mean over the batch, and accuracy counting."""
from __future__ import annotations

import numpy as np

from dtrain.backend import get_array_module
from dtrain.nn.module import Array


def _check_inputs(logits: Array, labels: Array, who: str) -> None:
    """Shapes (N, C) and (N,), integer labels in [0, C); otherwise a ValueError naming ``who``."""
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"{who}: logits must be 2-D (N, C), got shape {tuple(getattr(logits, 'shape', ()))}")
    n, c = logits.shape
    if getattr(labels, "ndim", None) != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{who}: labels must be 1-D with one class index per row of logits ({n}), "
            f"got shape {tuple(getattr(labels, 'shape', ()))}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{who}: labels must be integer class indices, got dtype {labels.dtype}")
    if n == 0:
        raise ValueError(f"{who}: empty batch (N=0)")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= c:
        raise ValueError(f"{who}: labels must lie in [0, {c}) for {c} classes, got values in [{lo}, {hi}]")


def _count_correct(logits: Array, labels: Array) -> int:
    xp = get_array_module(logits)
    return int(xp.count_nonzero(xp.argmax(logits, axis=1) == labels))


def accuracy_counts(logits: Array, labels: Array) -> tuple[int, int]:
    """(number of rows whose arg-max logit is the label, number of rows)."""
    _check_inputs(logits, labels, "accuracy_counts")
    return _count_correct(logits, labels), int(labels.shape[0])


class SoftmaxCrossEntropy:
    """``mean_n(logsumexp(logits[n]) - logits[n, labels[n]])``, PyTorch's ``cross_entropy``.

    Not a layer: ``forward`` takes the labels too and returns a 0-d array; ``backward``
    returns the gradient w.r.t. the logits of the last forward.
    """

    def __init__(self) -> None:
        self._cache: tuple[Array, Array, Array] | None = None  # softmax probabilities, labels, logits

    def __call__(self, logits: Array, labels: Array) -> Array:
        return self.forward(logits, labels)

    def forward(self, logits: Array, labels: Array) -> Array:
        """(N, C) logits, (N,) integer labels -> 0-d loss array in the logits' dtype
        (float32 for float16 logits, which are worked on in float32)."""
        _check_inputs(logits, labels, "SoftmaxCrossEntropy")
        xp = get_array_module(logits)
        # float16 (mixed precision) lacks the range and digits for log-sum-exp: shifted
        # logits can overflow and the per-row sums round badly, so work in float32.
        work = logits.astype(np.float32) if logits.dtype == np.float16 else logits
        shifted = work - work.max(axis=1, keepdims=True)  # largest exponent is 0: no overflow
        exp = xp.exp(shifted)
        sum_exp = exp.sum(axis=1)
        rows = xp.arange(logits.shape[0])
        loss = (xp.log(sum_exp) - shifted[rows, labels]).mean()
        self._cache = (exp / sum_exp[:, None], labels, logits)
        return loss

    def backward(self, scale: float = 1.0) -> Array:
        """(N, C) gradient of ``scale * loss`` w.r.t. the logits: ``scale * (softmax - onehot) / N``,
        in the logits' dtype (computed in float32 for float16 logits; ``scale`` is the loss
        scale of mixed precision, which keeps small gradients above float16's underflow)."""
        if self._cache is None:
            raise RuntimeError("SoftmaxCrossEntropy: backward called before forward")
        probs, labels, logits = self._cache
        xp = get_array_module(probs)
        n = probs.shape[0]
        grad = probs.copy()
        grad[xp.arange(n), labels] -= 1
        grad *= scale / n
        return grad.astype(logits.dtype, copy=False)

    def num_correct(self) -> int:
        """Rows of the last forward whose arg-max logit is the label."""
        if self._cache is None:
            raise RuntimeError("SoftmaxCrossEntropy: num_correct called before forward")
        _, labels, logits = self._cache
        return _count_correct(logits, labels)
