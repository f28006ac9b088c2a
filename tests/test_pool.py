"""MaxPool2d and AvgPool2d: PyTorch parity (ties and overlapping windows included), finite differences, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import assert_matches_torch, layer_gradcheck

from dtrain.backend import to_host
from dtrain.nn.pool import AvgPool2d, MaxPool2d

# (input shape, kernel, stride, padding)
CASES = [
    ((1, 1, 4, 4), 2, None, 0),  # batch 1, stride defaults to the kernel
    ((2, 3, 13, 13), 3, 2, 0),  # AlexNet's overlapping windows
    ((2, 2, 7, 9), (3, 2), (2, 3), 1),  # rectangular, padding
    ((3, 2, 8, 8), 3, 2, 1),  # overlapping and padded
    ((2, 1, 9, 10), 4, 3, 2),  # padding = kernel / 2; (H + 2P - K) not divisible by the stride
    ((1, 2, 5, 6), 1, 1, 0),  # 1x1 window: identity
    ((2, 2, 6, 7), (2, 4), 1, (1, 2)),  # stride 1, rectangular padding
]
CASE_IDS = [f"{'x'.join(map(str, c[0]))}_k{c[1]}s{c[2]}p{c[3]}" for c in CASES]
POOLS = [(MaxPool2d, torch.nn.MaxPool2d), (AvgPool2d, torch.nn.AvgPool2d)]
POOL_IDS = ["max", "avg"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("pools", POOLS, ids=POOL_IDS)
def test_matches_torch(xp, rng, dtype, case, pools):
    shape, k, s, p = case
    ours, theirs = pools
    x = rng.normal(size=shape).astype(dtype)
    assert_matches_torch(ours(k, s, p), theirs(k, s, p), x, xp, rng)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6]], ids=[CASE_IDS[1], CASE_IDS[3], CASE_IDS[6]])
def test_max_pool_ties_go_to_the_first_max_like_torch(xp, rng, case):
    # Integer inputs tie everywhere; the gradient must go to exactly the element PyTorch picks.
    shape, k, s, p = case
    x = rng.integers(-2, 3, size=shape).astype(np.float64)
    assert_matches_torch(MaxPool2d(k, s, p), torch.nn.MaxPool2d(k, s, p), x, xp, rng)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_max_pool_after_relu_runs_relus_backward_bit_for_bit(xp, rng, dtype, case):
    """forward_after_relu + backward_through_relu give the bits of the pool's backward followed
    by ReLU's (zero where ReLU's output is <= 0): ties of zeros, all-zero windows and a NaN."""
    shape, k, s, p = case
    relu_out = np.maximum(rng.integers(-2, 3, size=shape).astype(dtype), 0)  # many ties and zeros
    relu_out.reshape(-1)[1] = np.nan
    x = xp.asarray(relu_out)
    plain, fused = MaxPool2d(k, s, p), MaxPool2d(k, s, p)
    y_plain, y_fused = plain.forward(x), fused.forward_after_relu(x)
    np.testing.assert_array_equal(to_host(y_fused), to_host(y_plain))
    g = xp.asarray(rng.normal(size=y_plain.shape).astype(dtype))
    expected = to_host(plain.backward(g.copy()))
    expected[~(relu_out > 0) & ~np.isnan(relu_out)] = 0  # ReLU's backward from its output
    np.testing.assert_array_equal(to_host(fused.backward_through_relu(g.copy())), expected)


def test_max_pool_backward_must_match_how_forward_ran(rng):
    x = np.maximum(rng.normal(size=(1, 1, 4, 4)), 0)
    pool = MaxPool2d(2)
    pool.forward_after_relu(x)
    with pytest.raises(RuntimeError, match="backward_through_relu"):
        pool.backward(np.ones((1, 1, 2, 2)))
    pool.forward(x)
    with pytest.raises(RuntimeError, match="needs forward_after_relu first"):
        pool.backward_through_relu(np.ones((1, 1, 2, 2)))


def test_max_pool_routes_each_gradient_to_one_element():
    pool = MaxPool2d(3, stride=2)
    x = np.zeros((1, 1, 5, 5))  # all tied: every window's first element wins
    pool.forward(x)
    dx = pool.backward(np.arange(1.0, 5.0).reshape(1, 1, 2, 2))
    expected = np.zeros((5, 5))
    expected[0, 0], expected[0, 2], expected[2, 0], expected[2, 2] = 1, 2, 3, 4
    np.testing.assert_array_equal(dx[0, 0], expected)
    assert dx.sum() == 10  # nothing duplicated where the windows overlap


def test_max_pool_overlapping_windows_accumulate():
    pool = MaxPool2d(3, stride=2)
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 2, 2] = 1.0  # the shared centre is the max of all four windows
    pool.forward(x)
    dx = pool.backward(np.ones((1, 1, 2, 2)))
    assert dx[0, 0, 2, 2] == 4 and dx.sum() == 4


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]], ids=[CASE_IDS[1], CASE_IDS[2], CASE_IDS[4]])
def test_max_pool_finite_differences(xp, rng, case):
    shape, k, s, p = case
    # Distinct values 0.01 apart: the 1e-6 finite-difference steps never change a window's argmax.
    x = rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01
    layer_gradcheck(MaxPool2d(k, s, p), xp.asarray(x), rng)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]], ids=[CASE_IDS[1], CASE_IDS[2], CASE_IDS[4]])
def test_avg_pool_finite_differences(xp, rng, case):
    shape, k, s, p = case
    layer_gradcheck(AvgPool2d(k, s, p), xp.asarray(rng.normal(size=shape)), rng)


@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d], ids=POOL_IDS)
def test_results_are_fresh_arrays(cls, rng):
    pool = cls(2)
    x1, x2 = rng.normal(size=(1, 1, 4, 4)), rng.normal(size=(1, 1, 4, 4))
    y1 = pool.forward(x1)
    dx1 = pool.backward(np.ones_like(y1))
    y1_kept, dx1_kept = y1.copy(), dx1.copy()
    y2 = pool.forward(x2)
    dx2 = pool.backward(2 * np.ones_like(y2))
    np.testing.assert_array_equal(y1, y1_kept)
    np.testing.assert_array_equal(dx1, dx1_kept)
    assert not np.shares_memory(dx1, dx2) and not np.shares_memory(y1, x1)


@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d], ids=POOL_IDS)
def test_shapes_and_repr(cls):
    pool = cls(3, 2, 1)
    assert pool.output_shape((5, 13, 12)) == (5, 7, 6)
    assert pool.flops((5, 13, 12)) == 0 and pool.num_parameters() == 0
    assert repr(cls(3, 2)) == f"{cls.__name__}(kernel_size=3, stride=2, padding=0)"
    assert repr(cls((2, 3))) == f"{cls.__name__}(kernel_size=(2, 3), stride=(2, 3), padding=0)"


@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d], ids=POOL_IDS)
def test_input_errors_name_the_layer_and_shapes(cls):
    pool = cls(3, 2, 1)
    name = cls.__name__ + r"\(kernel_size=3, stride=2, padding=1\)"
    with pytest.raises(ValueError, match=name + r" expects a 4-D input \(N, C, H, W\), got shape \(2, 8, 8\)"):
        pool.forward(np.zeros((2, 8, 8)))
    unpadded = cls.__name__ + r"\(kernel_size=3, stride=2, padding=0\)"
    with pytest.raises(ValueError, match=unpadded + r": kernel 3x3 is larger than the padded input 2x6 "
                                                  r"\(input shape \(2, 2, 6\), padding \(0, 0\)\)"):
        cls(3, 2).forward(np.zeros((1, 2, 2, 6)))
    with pytest.raises(ValueError, match=name + r" got input shape \(2, 6, 0\) with a non-positive spatial size"):
        pool.output_shape((2, 6, 0))
    with pytest.raises(RuntimeError, match=name + r": backward needs a forward first"):
        pool.backward(np.zeros((1, 2, 3, 3)))
    pool.forward(np.zeros((1, 2, 6, 6)))
    with pytest.raises(ValueError, match=r"grad_out has shape \(1, 2, 4, 4\), the forward output was \(1, 2, 3, 3\)"):
        pool.backward(np.zeros((1, 2, 4, 4)))


@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d], ids=POOL_IDS)
@pytest.mark.parametrize("args,match", [
    ((0,), r"kernel_size and stride must be positive, got kernel_size=0"),
    ((3, 0), r"kernel_size and stride must be positive.*stride=0"),
    ((3, 1, -1), r"padding must be between 0 and half the kernel size, got padding=-1"),
    ((3, 1, 2), r"padding must be between 0 and half the kernel size, got padding=2 for kernel_size=3"),
    (((4, 2), 1, (2, 2)), r"padding must .* got padding=\(2, 2\) for kernel_size=\(4, 2\)"),
    ((2.0,), r"kernel_size must be an int or a pair of ints, got 2.0"),
])
def test_constructor_errors(cls, args, match):
    with pytest.raises(ValueError, match=cls.__name__ + ": " + match):
        cls(*args)
