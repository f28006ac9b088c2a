"""Optimizers over a :class:`~dtrain.nn.flat.FlatParameters` buffer, and learning-rate schedules."""
from __future__ import annotations

import inspect
from typing import Any

from dtrain.nn.flat import FlatParameters
from dtrain.optim.adam import Adam, AdamW
from dtrain.optim.base import Optimizer
from dtrain.optim.rmsprop import RMSprop
from dtrain.optim.schedule import SCHEDULE_KINDS, LRSchedule
from dtrain.optim.sgd import SGD

OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}


def build_optimizer(name: str, flat: FlatParameters, **kwargs: Any) -> Optimizer:
    """The optimizer registered as ``name`` (case-insensitive) over ``flat``, with ``kwargs`` as options."""
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(sorted(OPTIMIZERS))}")
    options = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "flat")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no option(s) {', '.join(unknown)}; its options are {', '.join(options)}"
        )
    return cls(flat, **kwargs)


__all__ = [
    "OPTIMIZERS",
    "SCHEDULE_KINDS",
    "SGD",
    "Adam",
    "AdamW",
    "LRSchedule",
    "Optimizer",
    "RMSprop",
    "build_optimizer",
]
