"""Helpers shared by the layer tests: relative error, finite differences, PyTorch parity."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dtrain.backend import get_array_module, to_host

# Largest accepted relative error against PyTorch, per dtype.
TORCH_TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
# Central differences in float64 with step 1e-6 are good to roughly 1e-8 relative.
FD_EPS = 1e-6
FD_TOL = 1e-6


def rel_err(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max |expected| (both taken to host float64)."""
    a = np.asarray(to_host(actual), dtype=np.float64)
    e = expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else to_host(expected)
    e = np.asarray(e, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    scale = np.abs(e).max() if e.size else 0.0
    diff = np.abs(a - e).max() if e.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


def sample_indices(shape: tuple[int, ...], count: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Up to ``count`` distinct multi-indices into an array of ``shape``."""
    size = int(np.prod(shape))
    flat = rng.choice(size, size=min(count, size), replace=False)
    return [tuple(int(i) for i in np.unravel_index(f, shape)) for f in flat]


def finite_difference(loss: Callable[[], float], array: Any, index: tuple[int, ...], eps: float = FD_EPS) -> float:
    """Central-difference derivative of ``loss()`` w.r.t. ``array[index]`` (perturbed in place)."""
    old = float(array[index])
    array[index] = old + eps
    up = loss()
    array[index] = old - eps
    down = loss()
    array[index] = old
    return (up - down) / (2 * eps)


def check_against_finite_differences(
    loss: Callable[[], float],
    arrays: dict[str, Any],
    analytic: dict[str, np.ndarray],
    rng: np.random.Generator,
    samples: int = 8,
    tol: float = FD_TOL,
) -> None:
    """Compare ``analytic[name]`` with finite differences of ``loss`` at sampled entries of ``arrays[name]``."""
    for name, array in arrays.items():
        grad = np.asarray(to_host(analytic[name]), dtype=np.float64)
        indices = sample_indices(tuple(array.shape), samples, rng)
        numeric = np.array([finite_difference(loss, array, i) for i in indices])
        exact = np.array([grad[i] for i in indices])
        scale = max(np.abs(grad).max(), 1e-12)
        err = np.abs(numeric - exact).max() / scale
        assert err < tol, f"{name}: finite differences {numeric} vs backward {exact} (rel err {err:.2e})"


def layer_gradcheck(layer: Any, x: Any, rng: np.random.Generator, samples: int = 8, tol: float = FD_TOL) -> None:
    """Finite-difference check of a layer's input and parameter gradients for ``sum(layer(x) * G)``."""
    xp = get_array_module(x)
    y = layer.forward(x)
    weights = xp.asarray(rng.normal(size=y.shape))
    analytic = {"input": layer.backward(weights.copy()).copy()}  # backward may overwrite its argument
    analytic.update({name: g.copy() for name, g in layer.grads.items()})

    def loss() -> float:
        return float((layer.forward(x) * weights).sum())

    arrays = {"input": x, **layer.params}
    check_against_finite_differences(loss, arrays, analytic, rng, samples, tol)


def assert_matches_torch(
    layer: Any, torch_layer: torch.nn.Module, x: np.ndarray, xp: Any, rng: np.random.Generator
) -> Any:
    """Run ``layer`` and ``torch_layer`` (same weights, same mode) forward and backward on ``x``.

    Asserts output, input gradient, parameter gradients and buffers agree within
    ``TORCH_TOL[x.dtype]``; returns the layer's output.
    """
    tol = TORCH_TOL[x.dtype]
    torch_layer.to(getattr(torch, x.dtype.name))
    torch_layer.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    torch_layer.train(layer.training)
    y = layer.forward(xp.asarray(x))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch_layer(xt)
    assert y.dtype == x.dtype, f"output dtype {y.dtype}, input {x.dtype}"
    assert rel_err(y, yt) < tol, f"forward rel err {rel_err(y, yt):.2e}"
    grad_out = rng.normal(size=tuple(yt.shape)).astype(x.dtype)
    dx = layer.backward(xp.array(grad_out))  # a copy: backward may overwrite its argument
    yt.backward(torch.from_numpy(grad_out))
    assert dx.dtype == x.dtype
    assert rel_err(dx, xt.grad) < tol, f"input grad rel err {rel_err(dx, xt.grad):.2e}"
    for name, p in torch_layer.named_parameters():
        err = rel_err(layer.grads[name], p.grad)
        assert err < tol, f"grad {name} rel err {err:.2e}"
    for name, b in torch_layer.named_buffers():
        err = rel_err(layer.buffers[name], b)
        assert err < tol, f"buffer {name} rel err {err:.2e}"
    return y
