"""Learning-rate schedules: linear warm-up, then constant, step decay or cosine annealing.

``lr_at(step)`` is the learning rate of the update that follows ``step`` completed
updates (``step = 0`` for the first one); the training loop sets ``optimizer.lr =
schedule.lr_at(step)`` before every ``optimizer.step()``. With ``W = warmup_steps``,
``T = total_steps - W``, ``f0 = warmup_start_factor`` and ``s = step - W``:

- warm-up, ``step < W``: ``base_lr * (f0 + (1 - f0) * step / W)``, rising linearly from
  ``f0 * base_lr`` at step 0 and reaching ``base_lr`` at step ``W``
  (``torch.optim.lr_scheduler.LinearLR(start_factor=f0, total_iters=W)``);
- ``constant``: ``base_lr``;
- ``step``: ``max(min_lr, base_lr * gamma ** (s // step_size))`` (``StepLR``, floored at ``min_lr``);
- ``cosine``: ``min_lr + (base_lr - min_lr) * (1 + cos(pi * s / T)) / 2``, from ``base_lr``
  at ``s = 0`` down to ``min_lr`` at ``s = T`` (``CosineAnnealingLR(T_max=T, eta_min=min_lr)``).

Steps past ``total_steps`` keep the value at ``total_steps``. ``step_size`` is used only by
``kind="step"`` and ignored otherwise.
"""
from __future__ import annotations

import math

from dtrain.checks import check_int, check_real

SCHEDULE_KINDS = ("constant", "step", "cosine")


class LRSchedule:
    """The learning rate as a function of the step; see the module docstring for the formulas."""

    def __init__(self, base_lr: float, kind: str, total_steps: int, warmup_steps: int = 0,
                 warmup_start_factor: float = 0.0, step_size: int | None = None, gamma: float = 0.1,
                 min_lr: float = 0.0) -> None:
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"LRSchedule: kind must be one of {', '.join(SCHEDULE_KINDS)}, got {kind!r}")
        self.kind = kind
        self.base_lr = check_real(base_lr, "LRSchedule: base_lr", 0.0)
        self.total_steps = check_int(total_steps, "LRSchedule: total_steps", 1)
        self.warmup_steps = check_int(warmup_steps, "LRSchedule: warmup_steps", 0)
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"LRSchedule: warmup_steps ({warmup_steps}) exceeds total_steps ({total_steps}); "
                f"shorten the warm-up or train longer"
            )
        if kind == "cosine" and self.warmup_steps == self.total_steps:
            raise ValueError(
                f"LRSchedule: a cosine schedule needs steps after the warm-up, but warmup_steps == "
                f"total_steps == {total_steps}; shorten the warm-up or use kind='constant'"
            )
        self.warmup_start_factor = check_real(warmup_start_factor, "LRSchedule: warmup_start_factor", 0.0, 1.0)
        self.step_size = check_int(step_size, "LRSchedule: step_size", 1) if kind == "step" else step_size
        self.gamma = check_real(gamma, "LRSchedule: gamma", 0.0, 1.0, low_open=True)
        self.min_lr = check_real(min_lr, "LRSchedule: min_lr", 0.0, self.base_lr)

    def lr_at(self, step: int) -> float:
        """The learning rate for the update after ``step`` completed updates (``step >= 0``)."""
        step = min(check_int(step, "LRSchedule: lr_at step", 0), self.total_steps)
        if step < self.warmup_steps:
            f0 = self.warmup_start_factor
            return self.base_lr * (f0 + (1.0 - f0) * step / self.warmup_steps)
        s = step - self.warmup_steps
        if self.kind == "step":
            return max(self.min_lr, self.base_lr * self.gamma ** (s // self.step_size))
        if self.kind == "cosine":
            span = self.total_steps - self.warmup_steps
            return self.min_lr + (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * s / span)) / 2.0
        return self.base_lr

    def __repr__(self) -> str:
        return (f"LRSchedule(base_lr={self.base_lr}, kind={self.kind!r}, total_steps={self.total_steps}, "
                f"warmup_steps={self.warmup_steps}, warmup_start_factor={self.warmup_start_factor}, "
                f"step_size={self.step_size}, gamma={self.gamma}, min_lr={self.min_lr})")
