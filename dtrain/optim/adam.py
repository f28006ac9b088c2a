"""Adam with bias correction, and AdamW (decoupled weight decay)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from dtrain.backend import get_array_module
from dtrain.checks import check_bool, check_real
from dtrain.nn.flat import FlatParameters
from dtrain.nn.module import Array
from dtrain.optim import cpu_updates
from dtrain.optim.base import Optimizer


class Adam(Optimizer):
    """``torch.optim.Adam`` (``decoupled=False``) or ``torch.optim.AdamW`` (``decoupled=True``).

    At step ``t`` (from 1): weight decay either shrinks the parameters first,
    ``p *= 1 - lr * weight_decay`` (decoupled), or is added to the gradient,
    ``d = g + weight_decay * p``. Then ``m += (1 - beta1) * (d - m)``,
    ``v = beta2 * v + (1 - beta2) * d * d`` and
    ``p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``.
    """

    hyperparameter_names = ("lr", "betas", "eps", "weight_decay", "decoupled")

    def __init__(self, flat: FlatParameters, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False) -> None:
        self.betas = betas
        self.eps = eps
        self.decoupled = decoupled
        super().__init__(flat, lr, weight_decay)

    def _validate(self) -> None:
        super()._validate()
        name = type(self).__name__
        try:
            beta1, beta2 = self.betas
        except (TypeError, ValueError):
            raise ValueError(f"{name}: betas must be a pair of numbers, got {self.betas!r}") from None
        self.betas = (check_real(beta1, f"{name}: betas[0]", 0.0, 1.0, high_open=True),
                      check_real(beta2, f"{name}: betas[1]", 0.0, 1.0, high_open=True))
        # eps > 0 keeps the update of zero-gradient entries (and the flat padding) at 0, not 0/0
        self.eps = check_real(self.eps, f"{name}: eps", 0.0, low_open=True)
        self.decoupled = check_bool(self.decoupled, f"{name}: decoupled")

    def _state_names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _adds_decay_to_grad(self) -> bool:
        return self.weight_decay != 0 and not self.decoupled  # AdamW shrinks the parameters instead

    def _fused_update(self, t: int) -> Callable[..., None]:
        def update(p: Array, g: Array, m: Array, v: Array) -> None:
            cpu_updates.adam(p, g, m, v, self.lr, self.betas, self.eps, self.weight_decay, self.decoupled, t)

        return update

    def _update(self, p: Array, g: Array, state: dict[str, Array], tmp: Array, decayed: Array | None,
                t: int) -> None:
        xp = get_array_module(p)
        beta1, beta2 = self.betas
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if self.decoupled:
            if self.weight_decay != 0:
                p *= 1.0 - self.lr * self.weight_decay
            d = g
        else:
            d = self._decayed_grad(p, g, decayed)
        xp.subtract(d, m, out=tmp)
        tmp *= 1.0 - beta1
        m += tmp
        v *= beta2
        xp.multiply(d, d, out=tmp)
        tmp *= 1.0 - beta2
        v += tmp
        step_size = self.lr / (1.0 - beta1**t)
        xp.sqrt(v, out=tmp)
        tmp /= math.sqrt(1.0 - beta2**t)
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= step_size
        p -= tmp


class AdamW(Adam):
    """``Adam(decoupled=True)``, with PyTorch's AdamW default ``weight_decay=1e-2``."""

    def __init__(self, flat: FlatParameters, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(flat, lr, betas, eps, weight_decay, decoupled=True)

    def _validate(self) -> None:
        super()._validate()
        if not self.decoupled:
            raise ValueError("AdamW: decoupled must be true (use Adam for coupled L2 weight decay)")
