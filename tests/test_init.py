"""Initializers: fans as PyTorch computes them, and the spread each one promises."""
from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from dtrain.nn.init import INITIALIZERS, fans, initialize

SHAPE = (64, 32, 3, 3)  # fan_in 288, fan_out 576


def test_fans_follow_pytorch():
    assert fans((10, 20)) == (20, 10)
    assert fans(SHAPE) == (288, 576)
    with pytest.raises(ValueError, match="at least 2 dims"):
        fans((5,))


@pytest.mark.parametrize("name, std", [
    ("kaiming_normal", math.sqrt(2 / 288)),
    ("kaiming_uniform", math.sqrt(2 / 288)),
    ("xavier_normal", math.sqrt(2 / (288 + 576))),
    ("xavier_uniform", math.sqrt(2 / (288 + 576))),
    ("torch_default", 1 / math.sqrt(3 * 288)),
])
def test_initializer_standard_deviation(name, std):
    w = INITIALIZERS[name](np.random.default_rng(0), SHAPE)
    assert w.shape == SHAPE
    assert abs(w.mean()) < 0.05 * std
    assert w.std() == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize("name, bound", [("kaiming_uniform", math.sqrt(6 / 288)),
                                         ("xavier_uniform", math.sqrt(6 / 864)),
                                         ("torch_default", 1 / math.sqrt(288))])
def test_uniform_initializers_stay_in_bounds(name, bound):
    w = INITIALIZERS[name](np.random.default_rng(1), SHAPE)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound


def test_unknown_initializer_names_the_layer_and_choices():
    with pytest.raises(ValueError, match=r"Conv2d\(1, 2\): unknown init 'he'.*kaiming_normal"):
        initialize("he", np.random.default_rng(0), SHAPE, "Conv2d(1, 2)")


@pytest.mark.parametrize("name", sorted(INITIALIZERS))
@pytest.mark.parametrize("shape", [(4096, 1024), (96, 1, 5, 5), (3, 7)])
def test_a_float32_weight_is_drawn_in_pieces_with_the_values_of_one_draw(name, shape):
    whole = INITIALIZERS[name](np.random.default_rng(2), shape).astype(np.float32)
    tracemalloc.start()
    try:
        w = initialize(name, np.random.default_rng(2), shape, "Linear", np.float32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, whole)
    assert peak < w.nbytes + 2**20  # the weight and one float64 piece: never the weight in float64
