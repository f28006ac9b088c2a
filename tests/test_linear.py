"""Linear: PyTorch parity, finite differences, the GEMM routing and in-place gradient contract, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import assert_matches_torch, layer_gradcheck

from dtrain.backend import to_host
from dtrain.nn import gemm
from dtrain.nn.linear import Linear

SHAPES = [(1, 3, 2), (7, 5, 4), (16, 33, 10)]  # (batch, in_features, out_features)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,fin,fout", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch(xp, rng, dtype, n, fin, fout, bias):
    layer = Linear(fin, fout, bias=bias, rng=rng, dtype=dtype).to(xp)
    x = rng.normal(size=(n, fin)).astype(dtype)
    assert_matches_torch(layer, torch.nn.Linear(fin, fout, bias=bias), x, xp, rng)


@pytest.mark.parametrize("n,fin,fout", SHAPES)
def test_finite_differences(xp, rng, n, fin, fout):
    layer = Linear(fin, fout, rng=rng, dtype=np.float64).to(xp)
    layer_gradcheck(layer, xp.asarray(rng.normal(size=(n, fin))), rng)


def test_all_gemms_go_through_gemm_matmul(rng):
    calls = []

    def recording(a, b, out):
        calls.append((a.shape, b.shape))
        return np.matmul(a, b, out=out)

    layer = Linear(4, 3, rng=rng, dtype=np.float64)
    x = rng.normal(size=(5, 4))
    gemm.set_partitioner(recording)
    try:
        layer.forward(x)
        layer.backward(np.ones((5, 3)))
    finally:
        gemm.set_partitioner(None)
    assert calls == [((5, 4), (4, 3)), ((3, 5), (5, 4)), ((5, 3), (3, 4))]


@pytest.mark.parametrize("n", [1, 6])
def test_a_batch_last_input_keeps_its_order(xp, rng, n):
    """Flatten of a batch-last activation gives Linear the transpose of (in, N) memory; the
    output and the input gradient come back in that order (the layers after and before read
    them without a reorder) and equal those of a C-ordered input."""
    layer = Linear(12, 5, rng=rng, dtype=np.float64).to(xp)
    x = xp.asarray(rng.normal(size=(12, n))).T  # (N, 12), batch fastest in memory
    g = xp.asarray(rng.normal(size=(n, 5)))
    y = layer.forward(x)
    gx = layer.backward(g.copy())
    expected_y = layer.forward(xp.ascontiguousarray(x))
    expected = layer.backward(g.copy())
    for got in (y, gx):
        assert got.T.flags.c_contiguous
        assert n == 1 or not got.flags.c_contiguous
    np.testing.assert_allclose(to_host(y), to_host(expected_y), rtol=1e-12)
    np.testing.assert_allclose(to_host(gx), to_host(expected), rtol=1e-12)


@pytest.mark.parametrize("batch_last", [False, True])
def test_forward_relu_is_forward_then_relu_bit_for_bit(xp, rng, batch_last):
    layer = Linear(6, 5, rng=rng, dtype=np.float32).to(xp)
    x = rng.normal(size=(6, 8)).T if batch_last else rng.normal(size=(8, 6))
    x = xp.asarray(x.astype(np.float32))
    x[0, 0] = np.nan
    expected = to_host(layer.forward(x))
    got = to_host(layer.forward_relu(x))
    np.maximum(expected, 0, out=expected)
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(got[0]).all() and (got[1:] == 0).any() and (got[1:] > 0).any()


def test_backward_writes_grads_in_place(rng):
    layer = Linear(4, 3, rng=rng, dtype=np.float64)
    flat = np.zeros(15)
    layer.grads["weight"] = flat[:12].reshape(3, 4)  # what a flat gradient buffer does
    layer.grads["bias"] = flat[12:]
    x, g = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
    layer.forward(x)
    layer.backward(g)
    np.testing.assert_allclose(flat[:12].reshape(3, 4), g.T @ x, rtol=1e-12)
    np.testing.assert_allclose(flat[12:], g.sum(axis=0), rtol=1e-12)


def test_init_is_seeded_and_kaiming_scaled():
    a = Linear(400, 300, rng=np.random.default_rng(7))
    b = Linear(400, 300, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.params["weight"], b.params["weight"])
    assert a.params["weight"].dtype == np.float32 and a.params["weight"].shape == (300, 400)
    assert abs(a.params["weight"].std() / np.sqrt(2 / 400) - 1) < 0.02
    assert np.abs(a.params["bias"]).max() <= 1 / np.sqrt(400)


def test_shapes_and_flops():
    layer = Linear(12, 5)
    assert layer.output_shape((12,)) == (5,)
    assert layer.flops((12,)) == 2 * 12 * 5
    assert layer.num_parameters() == 12 * 5 + 5
    with pytest.raises(ValueError, match=r"Linear.*\(12,\).*Flatten"):
        layer.output_shape((3, 4))


def test_input_errors_name_the_layer():
    layer = Linear(4, 2, dtype=np.float64)
    with pytest.raises(ValueError, match=r"Linear\(in_features=4.*2-D input \(N, in_features\).*\(4,\)"):
        layer.forward(np.ones(4))
    with pytest.raises(ValueError, match=r"Linear\(in_features=4.*expects 4 input features.*\(2, 5\)"):
        layer.forward(np.ones((2, 5)))
    with pytest.raises(TypeError, match=r"Linear.*float32 input.*float64.*\.to\(xp, dtype\)"):
        layer.forward(np.ones((2, 4), dtype=np.float32))
    with pytest.raises(RuntimeError, match="backward called before forward"):
        Linear(4, 2).backward(np.ones((2, 2), dtype=np.float32))


@pytest.mark.parametrize("args", [(0, 3), (3, -1), (2.5, 3), (True, 3)])
def test_constructor_rejects_bad_sizes(args):
    with pytest.raises(ValueError, match="Linear: (in|out)_features must be an int >= 1"):
        Linear(*args)


def test_unknown_init_lists_choices():
    with pytest.raises(ValueError, match=r"unknown init 'orthogonal'; choose one of \['kaiming_normal'"):
        Linear(3, 3, init="orthogonal")
