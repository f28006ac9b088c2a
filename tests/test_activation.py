"""ReLU, LeakyReLU, Tanh, Sigmoid: PyTorch parity, finite differences, extreme inputs."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from layer_checks import assert_matches_torch, layer_gradcheck

from dtrain.backend import to_host
from dtrain.nn.activation import LeakyReLU, ReLU, Sigmoid, Tanh

PAIRS = [
    (ReLU, torch.nn.ReLU, {}),
    (LeakyReLU, torch.nn.LeakyReLU, {}),
    (LeakyReLU, torch.nn.LeakyReLU, {"negative_slope": 0.2}),
    (Tanh, torch.nn.Tanh, {}),
    (Sigmoid, torch.nn.Sigmoid, {}),
]
IDS = ["relu", "leaky_default", "leaky_0.2", "tanh", "sigmoid"]


def away_from_zero(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal samples pushed off the ReLU kink so finite differences never straddle it."""
    x = rng.normal(size=shape)
    return x + np.sign(x) * 0.05


@pytest.mark.parametrize("ours,theirs,kwargs", PAIRS, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1, 4), (5, 3, 2, 2)])
def test_matches_torch(xp, rng, ours, theirs, kwargs, dtype, shape):
    x = (3 * rng.normal(size=shape)).astype(dtype)
    assert_matches_torch(ours(**kwargs), theirs(**kwargs), x, xp, rng)


@pytest.mark.parametrize("ours,theirs,kwargs", PAIRS, ids=IDS)
def test_finite_differences(xp, rng, ours, theirs, kwargs):
    layer_gradcheck(ours(**kwargs), xp.asarray(away_from_zero(rng, (3, 7))), rng)


def test_relu_gradient_at_zero_is_zero(xp):
    layer = ReLU()
    layer.forward(xp.zeros(3))
    assert to_host(layer.backward(xp.ones(3))).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_is_stable_at_extremes(xp, dtype):
    x = np.array([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in exp would warn
        layer = Sigmoid()
        y = layer.forward(xp.asarray(x))
        g = layer.backward(xp.ones_like(xp.asarray(x)))
    expected = torch.sigmoid(torch.from_numpy(x.astype(np.float64))).numpy()
    np.testing.assert_allclose(to_host(y), expected, rtol=1e-6, atol=1e-40)  # atol: float32 denormals
    assert np.isfinite(to_host(g)).all()


@pytest.mark.parametrize("cls", [ReLU, LeakyReLU, Tanh, Sigmoid])
def test_backward_before_forward(cls):
    with pytest.raises(RuntimeError, match=f"{cls.__name__}.*backward called before forward"):
        cls().backward(np.ones(2))


def test_relu_backward_masks_grad_out_in_place(xp):
    # The layer contract hands grad_out over to backward; ReLU reuses its memory.
    layer = ReLU()
    layer.forward(xp.asarray([-1.0, 2.0, 0.0, 3.0]))
    grad_out = xp.asarray([5.0, 6.0, 7.0, 8.0])
    dx = layer.backward(grad_out)
    assert dx is grad_out
    assert to_host(dx).tolist() == [0.0, 6.0, 0.0, 8.0]
