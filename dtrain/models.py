"""Build a Sequential model from a YAML-style spec (a list of layers with their arguments).

A spec is what ``conf/model/*.yaml`` holds::

    name: lenet
    input_shape: [1, 28, 28]
    init: kaiming_normal          # default initializer for Conv2d/Linear weights
    layers:
      - {type: Conv2d, in_channels: 1, out_channels: 6, kernel_size: 5}
      - {type: ReLU}
      ...

so a user defines a new model in YAML alone. The whole stack is shape-checked at build
time against ``input_shape``, so a wrong channel count fails before any data is read.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dtrain.nn import (
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    LeakyReLU,
    Linear,
    LocalResponseNorm,
    MaxPool2d,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)
from dtrain.nn.module import Module

LAYER_TYPES: dict[str, type[Module]] = {
    cls.__name__: cls
    for cls in (
        Conv2d, Linear, MaxPool2d, AvgPool2d, ReLU, LeakyReLU, Tanh, Sigmoid,
        BatchNorm1d, BatchNorm2d, Dropout, Flatten, LocalResponseNorm,
    )
}
_WEIGHTED = (Conv2d, Linear)


def build_model(spec: Mapping[str, Any], seed: int = 0, dtype: Any = np.float32) -> Sequential:
    """A Sequential on the host built from ``spec`` with weights drawn from ``seed``.

    Raises ``ValueError`` naming the offending layer for unknown types, bad arguments
    or shapes that do not fit ``spec["input_shape"]``.
    """
    name = spec.get("name", "model")
    layers_spec = spec.get("layers")
    if not layers_spec:
        raise ValueError(f"model {name!r}: the spec has no 'layers' list")
    rng = np.random.default_rng(seed)
    default_init = spec.get("init", "kaiming_normal")
    layers: list[Module] = []
    for index, raw in enumerate(layers_spec):
        layers.append(_build_layer(name, index, dict(raw), rng, default_init, seed, dtype))
    model = Sequential(*layers)
    if "input_shape" in spec:
        input_shape = tuple(int(d) for d in spec["input_shape"])
        try:
            out = model.output_shape(input_shape)
        except ValueError as err:
            raise ValueError(f"model {name!r} does not fit input shape {input_shape}: {err}") from None
        if len(out) != 1:
            raise ValueError(
                f"model {name!r} must end in a (classes,) vector per sample; it outputs {out}. "
                "Add a Flatten and a Linear layer."
            )
    return model


def _build_layer(model_name: str, index: int, args: dict[str, Any], rng: np.random.Generator,
                 default_init: str, seed: int, dtype: Any) -> Module:
    where = f"model {model_name!r}, layer {index}"
    type_name = args.pop("type", None)
    if type_name not in LAYER_TYPES:
        raise ValueError(f"{where}: unknown layer type {type_name!r}; choose one of {sorted(LAYER_TYPES)}")
    cls = LAYER_TYPES[type_name]
    if issubclass(cls, _WEIGHTED):
        args.setdefault("init", default_init)
        args["rng"] = rng
        args["dtype"] = dtype
    elif issubclass(cls, (BatchNorm1d, BatchNorm2d)):
        args["dtype"] = dtype
    elif issubclass(cls, Dropout):
        # The salt makes each Dropout's mask stream distinct and stable across runs.
        args.setdefault("seed", seed)
        args.setdefault("salt", index)
    for key, value in list(args.items()):
        if isinstance(value, list):
            args[key] = tuple(value)
    try:
        return cls(**args)
    except TypeError as err:
        raise ValueError(f"{where} ({type_name}): {err}") from None
