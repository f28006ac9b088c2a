"""Check that a state dict read from a file fits a model before copying it in.

``Module.load_state_dict`` stops at the first problem; loading a checkpoint or an
exported weight file instead reports every missing key, unexpected key and shape
mismatch at once, and names the file, so a user sees at a glance that the model config
differs from the one that wrote it.
"""
from __future__ import annotations

from typing import Any, Mapping

from dtrain.nn.module import Module


class StateDictMismatchError(ValueError):
    """A state dict's keys or shapes do not match the model it is loaded into."""


def model_shapes(model: Module) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter and buffer of ``model`` by its state_dict name (no copies)."""
    shapes = {name: tuple(mod.params[key].shape) for name, mod, key in model.named_parameters()}
    shapes.update({name: tuple(mod.buffers[key].shape) for name, mod, key in model.named_buffers()})
    return shapes


def check_state_dict(model: Module, state: Mapping[str, Any], source: str) -> None:
    """Raise :class:`StateDictMismatchError` unless ``state`` has exactly the model's keys and shapes.

    ``source`` names where ``state`` came from (a file path) for the message.
    """
    expected = model_shapes(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{name!r}: file {tuple(state[name].shape)} vs model {expected[name]}"
        for name in expected
        if name in state and tuple(state[name].shape) != expected[name]
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing from the file: {missing}")
    if unexpected:
        problems.append(f"not in the model: {unexpected}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    raise StateDictMismatchError(
        f"{source} does not fit the model ({'; '.join(problems)}). "
        f"Build the model from the same model config that produced {source}."
    )


def load_checked(model: Module, state: Mapping[str, Any], source: str) -> None:
    """:func:`check_state_dict`, then copy ``state`` into the model in place (casting dtype)."""
    check_state_dict(model, state, source)
    model.load_state_dict(dict(state), strict=True)
