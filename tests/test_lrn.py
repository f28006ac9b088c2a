"""LocalResponseNorm: PyTorch parity for odd and even windows, finite differences, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import assert_matches_torch, layer_gradcheck

from dtrain.nn.lrn import LocalResponseNorm, channel_window_sum


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(1, 6, 3, 4), (3, 3, 5), (2, 7, 2, 2, 3)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_torch(xp, rng, size, shape, dtype):
    params = {"alpha": 0.3, "beta": 0.75, "k": 1.5}  # large alpha so the normalization matters
    x = (2 * rng.normal(size=shape)).astype(dtype)
    assert_matches_torch(LocalResponseNorm(size, **params), torch.nn.LocalResponseNorm(size, **params), x, xp, rng)


def test_matches_torch_with_defaults(xp, rng):
    x = (30 * rng.normal(size=(2, 9, 3, 3))).astype(np.float64)
    assert_matches_torch(LocalResponseNorm(5), torch.nn.LocalResponseNorm(5), x, xp, rng)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_finite_differences(xp, rng, size):
    layer = LocalResponseNorm(size, alpha=0.5, beta=0.6, k=2.0)
    layer_gradcheck(layer, xp.asarray(rng.normal(size=(2, 5, 2, 3))), rng)


def test_window_sum_is_asymmetric_like_torch(xp):
    v = xp.asarray(np.arange(1.0, 6.0).reshape(1, 5))
    # size 4: two channels before, one after
    assert channel_window_sum(v, 2, 1).tolist() == [[3.0, 6.0, 10.0, 14.0, 12.0]]


def test_errors():
    with pytest.raises(ValueError, match="LocalResponseNorm: size must be an int >= 1"):
        LocalResponseNorm(0)
    with pytest.raises(ValueError, match="LocalResponseNorm: k must be > 0"):
        LocalResponseNorm(3, k=0.0)
    with pytest.raises(ValueError, match=r"LocalResponseNorm\(3.*\(N, C, \.\.\.\) with at least 3 dims, got shape \(4, 5\)"):
        LocalResponseNorm(3).forward(np.ones((4, 5)))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        LocalResponseNorm(3).backward(np.ones((1, 2, 3)))
    assert LocalResponseNorm(3).output_shape((4, 5, 5)) == (4, 5, 5)
