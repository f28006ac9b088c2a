"""LRSchedule against torch.optim.lr_scheduler and against its documented formulas."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler

from dtrain.optim import LRSchedule


def torch_lrs(base_lr: float, make_scheduler, steps: int) -> list[float]:
    """The lr torch uses for each of ``steps`` updates (read before each ``optimizer.step()``)."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=base_lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR calls step(epoch), which torch deprecates
        sched = make_scheduler(opt)
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return lrs


CASES = [
    ("StepLR",
     dict(base_lr=0.1, kind="step", total_steps=50, step_size=7, gamma=0.5),
     lambda o: lr_scheduler.StepLR(o, step_size=7, gamma=0.5)),
    ("CosineAnnealingLR",
     dict(base_lr=0.1, kind="cosine", total_steps=40, min_lr=1e-3),
     lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=40, eta_min=1e-3)),
    ("LinearLR-then-constant",
     dict(base_lr=0.1, kind="constant", total_steps=20, warmup_steps=5, warmup_start_factor=0.5),
     lambda o: lr_scheduler.LinearLR(o, start_factor=0.5, end_factor=1.0, total_iters=5)),
    ("LinearLR-then-StepLR",
     dict(base_lr=0.1, kind="step", total_steps=60, warmup_steps=10, warmup_start_factor=0.1, step_size=15,
          gamma=0.3),
     lambda o: lr_scheduler.SequentialLR(
         o, [lr_scheduler.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=10),
             lr_scheduler.StepLR(o, step_size=15, gamma=0.3)], milestones=[10])),
    ("LinearLR-then-CosineAnnealingLR",
     dict(base_lr=0.1, kind="cosine", total_steps=40, warmup_steps=8, warmup_start_factor=0.25, min_lr=2e-3),
     lambda o: lr_scheduler.SequentialLR(
         o, [lr_scheduler.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=8),
             lr_scheduler.CosineAnnealingLR(o, T_max=32, eta_min=2e-3)], milestones=[8])),
]


@pytest.mark.parametrize("name, kwargs, make", CASES, ids=[c[0] for c in CASES])
def test_matches_torch_schedulers(name, kwargs, make):
    sched = LRSchedule(**kwargs)
    steps = sched.total_steps + 1  # through the last step, where cosine reaches min_lr
    expected = torch_lrs(sched.base_lr, make, steps)
    ours = [sched.lr_at(t) for t in range(steps)]
    for t, (a, b) in enumerate(zip(ours, expected)):
        assert abs(a - b) <= 1e-12 * sched.base_lr, f"step {t}: {a} vs torch {b}"


def test_warmup_from_zero():
    sched = LRSchedule(0.2, "constant", total_steps=10, warmup_steps=4)
    assert [sched.lr_at(t) for t in range(6)] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2], abs=1e-15)
    assert sched.lr_at(0) == 0.0


def test_cosine_formula_and_clamp_after_total_steps():
    sched = LRSchedule(1.0, "cosine", total_steps=12, warmup_steps=2, min_lr=0.1)
    assert sched.lr_at(2) == 1.0
    assert sched.lr_at(7) == pytest.approx(0.55, abs=1e-15)  # halfway through the 10 cosine steps
    assert sched.lr_at(4) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.2)) / 2, abs=1e-15)
    assert sched.lr_at(12) == pytest.approx(0.1, abs=1e-15)
    assert sched.lr_at(1000) == sched.lr_at(12)


def test_step_decay_is_floored_at_min_lr_and_clamped():
    sched = LRSchedule(1.0, "step", total_steps=10, step_size=2, gamma=0.1, min_lr=1e-3)
    assert [sched.lr_at(t) for t in range(8)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    assert sched.lr_at(9) == 1e-3 and sched.lr_at(50) == sched.lr_at(10)


def test_constant_without_warmup_and_unused_step_size():
    sched = LRSchedule(0.3, "constant", total_steps=5, step_size=None)
    assert {sched.lr_at(t) for t in range(10)} == {0.3}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="linear"), "kind must be one of constant, step, cosine"),
        (dict(base_lr=-1.0), r"base_lr must be a number in \[0, inf\)"),
        (dict(total_steps=0), "total_steps must be an int >= 1"),
        (dict(total_steps=10.0), "total_steps must be an int >= 1"),
        (dict(warmup_steps=-1), "warmup_steps must be an int >= 0"),
        (dict(warmup_steps=11), r"warmup_steps \(11\) exceeds total_steps \(10\)"),
        (dict(kind="cosine", warmup_steps=10), "cosine schedule needs steps after the warm-up"),
        (dict(warmup_start_factor=1.5), r"warmup_start_factor must be a number in \[0, 1\]"),
        (dict(kind="step", step_size=None), "step_size must be an int >= 1"),
        (dict(kind="step", step_size=0), "step_size must be an int >= 1"),
        (dict(gamma=0.0), r"gamma must be a number in \(0, 1\]"),
        (dict(min_lr=0.2), r"min_lr must be a number in \[0, 0.1\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(base_lr=0.1, kind="constant", total_steps=10, step_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        LRSchedule(**args)


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_bad_step(step):
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        LRSchedule(0.1, "constant", total_steps=10).lr_at(step)
