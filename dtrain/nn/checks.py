"""Argument and input validation shared by layers: errors name the layer and the fix."""
from __future__ import annotations

from typing import Any


def pair(value: Any, what: str, layer: str) -> tuple[int, int]:
    """An int or a pair of ints as ``(h, w)``; anything else is a ``ValueError``."""
    if isinstance(value, bool):
        raise ValueError(f"{layer}: {what} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        h, w = value
    except (TypeError, ValueError):
        raise ValueError(f"{layer}: {what} must be an int or a pair of ints, got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (h, w)):
        raise ValueError(f"{layer}: {what} must be an int or a pair of ints, got {value!r}")
    return (h, w)


def check_rank(layer: Any, x: Any, ndim: int, layout: str) -> None:
    """Raise ``ValueError`` unless ``x`` has ``ndim`` dimensions (``layout`` e.g. 'N, C, H, W')."""
    if getattr(x, "ndim", None) != ndim:
        shape = tuple(getattr(x, "shape", ()))
        raise ValueError(
            f"{layer!r} expects a {ndim}-D input ({layout}), got shape {shape}"
        )


def check_dim(layer: Any, shape: tuple[int, ...], axis: int, expected: int, what: str) -> None:
    """Raise ``ValueError`` unless ``shape[axis] == expected`` (e.g. input channels)."""
    if shape[axis] != expected:
        raise ValueError(
            f"{layer!r} expects {expected} {what}, got input of shape {tuple(shape)}"
        )


def check_dtype(layer: Any, x: Any, expected: Any) -> None:
    """Raise ``TypeError`` unless ``x.dtype == expected`` (the layer's parameter dtype)."""
    if x.dtype != expected:
        raise TypeError(
            f"{layer!r} got a {x.dtype} input but its parameters are {expected}; "
            f"cast the input or convert the model with .to(xp, dtype)"
        )
