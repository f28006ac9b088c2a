"""RMSprop, optionally centered and with momentum."""
from __future__ import annotations

from dtrain.backend import get_array_module
from dtrain.checks import check_bool, check_real
from dtrain.nn.flat import FlatParameters
from dtrain.nn.module import Array
from dtrain.optim.base import Optimizer


class RMSprop(Optimizer):
    """``torch.optim.RMSprop`` on a flat buffer.

    With ``d = g + weight_decay * p``: ``v = alpha * v + (1 - alpha) * d * d``; the
    denominator is ``sqrt(v) + eps``, or, centered, ``sqrt(v - a * a) + eps`` with
    ``a += (1 - alpha) * (d - a)``. Without momentum ``p -= lr * d / denom``; with it
    ``buf = momentum * buf + d / denom`` and ``p -= lr * buf``.
    """

    hyperparameter_names = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")

    def __init__(self, flat: FlatParameters, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False) -> None:
        self.alpha = alpha
        self.eps = eps
        self.momentum = momentum
        self.centered = centered
        super().__init__(flat, lr, weight_decay)

    def _validate(self) -> None:
        super()._validate()
        self.alpha = check_real(self.alpha, "RMSprop: alpha", 0.0, 1.0, high_open=True)
        # eps > 0 keeps the update of zero-gradient entries (and the flat padding) at 0, not 0/0
        self.eps = check_real(self.eps, "RMSprop: eps", 0.0, low_open=True)
        self.momentum = check_real(self.momentum, "RMSprop: momentum", 0.0, 1.0, high_open=True)
        self.centered = check_bool(self.centered, "RMSprop: centered")

    def _state_names(self) -> tuple[str, ...]:
        names = ("square_avg",)
        if self.centered:
            names += ("grad_avg",)
        if self.momentum != 0:
            names += ("momentum_buffer",)
        return names

    def _update(self, p: Array, g: Array, state: dict[str, Array], tmp: Array, decayed: Array | None,
                t: int) -> None:
        xp = get_array_module(p)
        v = state["square_avg"]
        d = self._decayed_grad(p, g, decayed)
        v *= self.alpha
        xp.multiply(d, d, out=tmp)
        tmp *= 1.0 - self.alpha
        v += tmp
        if self.centered:
            a = state["grad_avg"]
            xp.subtract(d, a, out=tmp)
            tmp *= 1.0 - self.alpha
            a += tmp
            xp.multiply(a, a, out=tmp)
            xp.subtract(v, tmp, out=tmp)
            xp.sqrt(tmp, out=tmp)
        else:
            xp.sqrt(v, out=tmp)
        tmp += self.eps
        xp.divide(d, tmp, out=tmp)
        if self.momentum != 0:
            buf = state["momentum_buffer"]
            buf *= self.momentum
            buf += tmp
            xp.multiply(buf, self.lr, out=tmp)
        else:
            tmp *= self.lr
        p -= tmp
