"""Flatten: shapes like torch.nn.Flatten, backward restores the input shape, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import assert_matches_torch, layer_gradcheck

from dtrain.nn.flatten import Flatten


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (6, 2, 3), (4, 7)])
@pytest.mark.parametrize("start,end", [(1, -1), (2, -1), (1, 2), (2, 2)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_torch(xp, rng, shape, start, end, dtype):
    if max(start, end if end >= 0 else len(shape) + end) >= len(shape):
        pytest.skip("dims out of range for this shape")
    x = rng.normal(size=shape).astype(dtype)
    y = assert_matches_torch(Flatten(start, end), torch.nn.Flatten(start, end), x, xp, rng)
    assert Flatten(start, end).output_shape(shape[1:]) == tuple(y.shape[1:])


def test_finite_differences(xp, rng):
    layer_gradcheck(Flatten(), xp.asarray(rng.normal(size=(2, 3, 2, 2))), rng)


def test_errors():
    with pytest.raises(ValueError, match=r"Flatten: start_dim must be an int >= 1"):
        Flatten(0)
    with pytest.raises(ValueError, match=r"Flatten\(start_dim=1, end_dim=-1\) cannot flatten dims 1..-1 of a 1-D input"):
        Flatten().forward(np.ones(3))
    with pytest.raises(ValueError, match=r"cannot flatten dims 3..-1 of a 3-D input of shape \(1, 2, 3\)"):
        Flatten(3).output_shape((2, 3))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        Flatten().backward(np.ones((2, 3)))
