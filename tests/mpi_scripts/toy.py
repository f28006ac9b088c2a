"""A tiny Sequential whose backward writes known, rank-dependent gradients.

Every rank can recompute every other rank's gradients (:func:`local_grad`), so the
expected all-reduced result is known exactly without trusting the code under test.
"""
from __future__ import annotations

import time

import numpy as np

from dtrain.backend import get_array_module
from dtrain.nn.module import Module, Sequential

KEYS = {"weight": 0, "bias": 1}


def local_grad(rank: int, step: int, index: int, key: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng([rank, step, index, KEYS[key]]).standard_normal(shape).astype(np.float32)


class ToyLayer(Module):
    """Identity forward; backward writes ``local_grad(rank, step, ...)`` into its gradients."""

    def __init__(self, index: int, shape: tuple[int, ...], rank: int, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.default_rng([seed, rank, index])
        self.register_param("weight", rng.standard_normal(shape).astype(np.float32))
        self.register_param("bias", rng.standard_normal(shape[:1]).astype(np.float32))
        self.buffers["running"] = rng.standard_normal(shape[:1]).astype(np.float32)
        self.index, self.rank, self.step, self.jitter_s = index, rank, 0, 0.0
        self._sleep_rng = np.random.default_rng([seed, rank, index, 99])

    def forward(self, x):
        return x

    def backward(self, grad_out, input_grad=True):
        for key, grad in self.grads.items():
            xp = get_array_module(grad)
            grad[...] = xp.asarray(local_grad(self.rank, self.step, self.index, key, grad.shape))
        if self.jitter_s:
            time.sleep(self._sleep_rng.uniform(0, self.jitter_s))
        return grad_out


class Passive(Module):
    """A layer without parameters (like an activation)."""

    def forward(self, x):
        return x

    def backward(self, grad_out, input_grad=True):
        return grad_out


SHAPES = [(64, 32), None, (128, 64), (16, 128), None, (300, 17), (10, 300)]


def toy_model(rank: int, seed: int = 0) -> Sequential:
    """Seven layers (two without parameters), about 67k parameters; initial values differ per rank."""
    return Sequential(*[Passive() if shape is None else ToyLayer(i, shape, rank, seed)
                        for i, shape in enumerate(SHAPES)])


def set_step(model: Sequential, step: int, jitter_s: float = 0.0) -> None:
    for layer in model.layers:
        if isinstance(layer, ToyLayer):
            layer.step, layer.jitter_s = step, jitter_s


def expected_mean(model: Sequential, flat, size: int, step: int) -> np.ndarray:
    """The exact mean over ranks of every rank's gradients, laid out like ``flat.grads`` (float64)."""
    out = np.zeros(flat.grads.size, dtype=np.float64)
    for e in flat.entries:
        index = int(e.name.split(".")[0])
        total = sum(local_grad(r, step, index, e.key, e.shape).astype(np.float64) for r in range(size))
        out[e.offset:e.end] = (total / size).reshape(-1)
    return out
