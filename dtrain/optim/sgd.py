"""Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay."""
from __future__ import annotations

from collections.abc import Callable

from dtrain.backend import get_array_module
from dtrain.checks import check_bool, check_real
from dtrain.nn.flat import FlatParameters
from dtrain.nn.module import Array
from dtrain.optim import cpu_updates
from dtrain.optim.base import Optimizer


class SGD(Optimizer):
    """``torch.optim.SGD`` on a flat buffer.

    With ``d = g + weight_decay * p``: on the first step the momentum buffer is ``d``,
    afterwards ``buf = momentum * buf + (1 - dampening) * d``; the step direction is
    ``d + momentum * buf`` (Nesterov) or ``buf``, and ``p -= lr * direction``. Without
    momentum the direction is ``d``.
    """

    hyperparameter_names = ("lr", "momentum", "dampening", "nesterov", "weight_decay")

    def __init__(self, flat: FlatParameters, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        self.momentum = momentum
        self.dampening = dampening
        self.nesterov = nesterov
        super().__init__(flat, lr, weight_decay)

    def _validate(self) -> None:
        super()._validate()
        self.momentum = check_real(self.momentum, "SGD: momentum", 0.0, 1.0, high_open=True)
        self.dampening = check_real(self.dampening, "SGD: dampening", 0.0, 1.0)
        self.nesterov = check_bool(self.nesterov, "SGD: nesterov")
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError(
                f"SGD: nesterov=True needs momentum > 0 and dampening = 0, got momentum={self.momentum}, "
                f"dampening={self.dampening}"
            )

    def _state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum != 0 else ()

    def _fused_update(self, t: int) -> Callable[..., None]:
        def update(p: Array, g: Array, buf: Array | None = None) -> None:
            cpu_updates.sgd(p, g, g if buf is None else buf, self.lr, self.momentum, self.dampening,
                            self.weight_decay, self.nesterov, t == 1)

        return update

    def _update(self, p: Array, g: Array, state: dict[str, Array], tmp: Array, decayed: Array | None,
                t: int) -> None:
        xp = get_array_module(p)
        d = self._decayed_grad(p, g, decayed)
        direction = d
        if self.momentum != 0:
            buf = state["momentum_buffer"]
            if t == 1:
                buf[...] = d
            else:
                buf *= self.momentum
                if self.dampening:
                    xp.multiply(d, 1.0 - self.dampening, out=tmp)
                    buf += tmp
                else:  # (1 - 0) * d is d: one pass fewer, the same bits
                    buf += d
            if self.nesterov:
                xp.multiply(buf, self.momentum, out=tmp)
                tmp += d
                direction = tmp
            else:
                direction = buf
        xp.multiply(direction, self.lr, out=tmp)
        p -= tmp
