"""Exchange weights with PyTorch: state-dict files and an equivalent ``torch.nn.Sequential``.

dtrain's state_dict names are those of the equivalent ``torch.nn.Sequential``
(``0.weight``, ``3.running_mean``, ``3.num_batches_tracked``), so a weight file is a
plain name -> tensor mapping that either side loads with its own ``load_state_dict``:

- ``.pt`` / ``.pth``: ``torch.save`` of a dict of tensors (needs PyTorch; read back with
  ``torch.load(path, weights_only=True)``);
- ``.safetensors``: written and read through the safetensors package's NumPy API, so
  PyTorch is not needed (``safetensors.torch.load_file`` reads it on the torch side).

:func:`to_torch_sequential` builds the PyTorch twin of a dtrain model, layer by layer
with the same hyperparameters and weights; :func:`export_model` writes a model to take
away (``trainer.mode=export``): a ``torch.export`` program or the weights, and a JSON
card with the spec and the input normalization.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dtrain.atomic import atomic_write
from dtrain.checkpoint import dtrain_version
from dtrain.nn.activation import LeakyReLU, ReLU, Sigmoid, Tanh
from dtrain.nn.batchnorm import BatchNorm1d, BatchNorm2d
from dtrain.nn.conv import Conv2d
from dtrain.nn.dropout import Dropout
from dtrain.nn.flatten import Flatten
from dtrain.nn.linear import Linear
from dtrain.nn.lrn import LocalResponseNorm
from dtrain.nn.module import Module, Sequential
from dtrain.nn.pool import AvgPool2d, MaxPool2d

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"


class WeightFileError(ValueError):
    """A weight file cannot be read as a flat name -> tensor mapping."""


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(
            "this needs PyTorch, which is not installed: pip install torch "
            "(or use a .safetensors file, which dtrain reads and writes without PyTorch)"
        ) from None
    return torch


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    raise ValueError(
        f"{path}: unknown weight file type {path.suffix!r}; use .pt/.pth (PyTorch) or .safetensors"
    )


# -- files -------------------------------------------------------------------------------
def write_weights(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write a name -> array mapping as ``.pt``/``.pth`` or ``.safetensors`` (atomically)."""
    path = Path(path)
    fmt = _format(path)
    arrays = {name: np.asarray(value, order="C") for name, value in state.items()}
    if fmt == "torch":
        torch = _torch()
        tensors = {name: torch.from_numpy(value.copy()) for name, value in arrays.items()}
        return atomic_write(path, lambda f: torch.save(tensors, f))
    from safetensors.numpy import save

    blob = save(arrays, metadata={"format": "pt", "producer": f"dtrain {dtrain_version()}"})
    return atomic_write(path, lambda f: f.write(blob))


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``.pt``/``.pth`` or ``.safetensors`` weight file as a dict of NumPy arrays.

    Raises ``FileNotFoundError`` for a missing file and :class:`WeightFileError` naming
    the file when it is unreadable or is not a flat dict of tensors.
    """
    path = Path(path)
    fmt = _format(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as err:  # safetensors raises its own SafetensorError (and others) on bad files
            raise WeightFileError(f"{path} is not a readable safetensors file ({err})") from err
    torch = _torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, zip errors, RuntimeError for truncated archives
        raise WeightFileError(
            f"{path} cannot be loaded as a PyTorch state_dict ({type(err).__name__}: {err}); "
            f"save `model.state_dict()` with torch.save, not the whole module"
        ) from err
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise WeightFileError(
            f"{path} is not a flat state_dict: entries {bad} are not tensors; "
            f"save the inner `model.state_dict()` dict on its own"
        )
    out = {}
    for name, tensor in obj.items():
        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16
            t = t.to(torch.float32)
        out[str(name)] = t.numpy().copy()
    return out


# -- model <-> file ----------------------------------------------------------------------
def export_weights(model: Module, path: str | os.PathLike) -> Path:
    """Save ``model``'s parameters and buffers under its (PyTorch) state_dict names."""
    return write_weights(model.state_dict(), path)


def import_weights(model: Module, path: str | os.PathLike) -> None:
    """Load a PyTorch-named weight file into ``model`` in place (cast to the model's dtypes).

    All keys and shapes are checked first; a ``StateDictMismatchError`` lists every
    missing key, unexpected key and shape mismatch and names the file.
    """
    path = Path(path)
    model.load_state_dict(read_weights(path), source=f"weight file {path}")


# -- the PyTorch twin --------------------------------------------------------------------
def _conv2d(nn: Any, layer: Conv2d) -> Any:
    return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                     padding=layer.padding, bias="bias" in layer.params)


def _linear(nn: Any, layer: Linear) -> Any:
    return nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)


def _square(hw: tuple[int, int]) -> int | tuple[int, int]:
    """``(k, k)`` as ``k`` (how torch's pooling layers store and print square sizes)."""
    return hw[0] if hw[0] == hw[1] else hw


def _pool(torch_cls: str) -> Callable[[Any, Any], Any]:
    return lambda nn, layer: getattr(nn, torch_cls)(
        _square(layer.kernel_size), stride=_square(layer.stride), padding=_square(layer.padding)
    )


def _batchnorm(torch_cls: str) -> Callable[[Any, Any], Any]:
    return lambda nn, layer: getattr(nn, torch_cls)(
        layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine, track_running_stats=True
    )


_TWINS: dict[type[Module], Callable[[Any, Any], Any]] = {
    Conv2d: _conv2d,
    Linear: _linear,
    MaxPool2d: _pool("MaxPool2d"),
    AvgPool2d: _pool("AvgPool2d"),
    ReLU: lambda nn, layer: nn.ReLU(),
    LeakyReLU: lambda nn, layer: nn.LeakyReLU(layer.negative_slope),
    Tanh: lambda nn, layer: nn.Tanh(),
    Sigmoid: lambda nn, layer: nn.Sigmoid(),
    BatchNorm1d: _batchnorm("BatchNorm1d"),
    BatchNorm2d: _batchnorm("BatchNorm2d"),
    Dropout: lambda nn, layer: nn.Dropout(layer.p),
    Flatten: lambda nn, layer: nn.Flatten(layer.start_dim, layer.end_dim),
    LocalResponseNorm: lambda nn, layer: nn.LocalResponseNorm(layer.size, alpha=layer.alpha, beta=layer.beta,
                                                              k=layer.k),
}


def _twin(nn: Any, layer: Module, name: str) -> Any:
    if isinstance(layer, Sequential):
        return nn.Sequential(*(_twin(nn, child, f"{name}.{i}") for i, child in enumerate(layer.layers)))
    build = _TWINS.get(type(layer))
    if build is None:
        known = ", ".join(sorted(cls.__name__ for cls in _TWINS))
        raise TypeError(
            f"to_torch_sequential: layer {name} ({type(layer).__name__}) has no PyTorch twin; known: {known}"
        )
    return build(nn, layer)


def to_torch_sequential(model: Sequential) -> Any:
    """The equivalent ``torch.nn.Sequential``: same layers, hyperparameters and weights.

    Parameters and buffers are copied (on the CPU, in the model's float dtype) and the
    twin is put in the same train/eval mode as ``model``. Dropout masks of the two
    differ (dtrain draws them from its own counter-based generator); everything else
    computes the same function.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"to_torch_sequential needs a dtrain Sequential, got {type(model).__name__}")
    torch = _torch()
    twin = _twin(torch.nn, model, "model")
    dtype = getattr(torch, np.dtype(model.dtype).name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"to_torch_sequential: the model's dtype {model.dtype} has no PyTorch float equivalent")
    twin.to(dtype)
    twin.load_state_dict({name: torch.from_numpy(np.asarray(v, order="C")) for name, v in model.state_dict().items()})
    twin.train(model.training)
    return twin


# -- a model to take away ----------------------------------------------------------------
EXPORT_FORMATS = ("pt2", "pt", "safetensors")


def export_model(model: Sequential, spec: Mapping[str, Any], normalization: Mapping[str, float],
                 directory: str | os.PathLike, fmt: str = "pt2", source: str | None = None) -> list[Path]:
    """Write ``model`` for use without dtrain: ``model.<fmt>`` and ``model.json``; returns both.

    ``pt2`` is a ``torch.export`` program (architecture and weights: ``torch.export.load``
    is all it takes); ``pt`` and ``safetensors`` hold the state_dict (weights only, under
    PyTorch's names). ``model.json`` says how to use them: the model spec (``layers``,
    ``input_shape``), the class count, the input normalization ``x = (pixel *
    pixel_scale - mean) / std`` (``mean``, ``std`` as trained with) and the source
    checkpoint. The model is exported in eval mode (dropout off, BatchNorm's running
    statistics).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    directory = Path(directory)
    weights = directory / f"model.{fmt}"
    model.eval()
    input_shape = tuple(int(d) for d in spec["input_shape"])
    if fmt == "pt2":
        torch = _torch()
        twin = to_torch_sequential(model).eval()
        example = torch.zeros((2, *input_shape), dtype=getattr(torch, model.dtype.name))
        program = torch.export.export(twin, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        atomic_write(weights, lambda f: torch.export.save(program, f))
    else:
        write_weights(model.state_dict(), weights)
    meta = {
        "format": fmt,
        "weights": weights.name,
        "input_shape": list(input_shape),
        "classes": int(model.output_shape(input_shape)[0]),
        "pixel_scale": 1 / 255,
        "mean": float(normalization["mean"]),
        "std": float(normalization["std"]),
        "model": dict(spec),
        "checkpoint": source,
        "dtrain_version": dtrain_version(),
    }
    card = atomic_write(directory / "model.json", lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    return [weights, card]
