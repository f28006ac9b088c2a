"""FlatParameters: layers' params/grads become views of two contiguous buffers."""
from __future__ import annotations

import numpy as np
import pytest

from dtrain.backend import get_array_module, to_host
from dtrain.nn.flat import FlatEntry, FlatParameters
from dtrain.nn.module import Module, Sequential


class TinyAffine(Module):
    """y = x @ weight + bias with a (n_in, n_out) weight; backward writes grads in place."""

    def __init__(self, xp, rng, n_in: int, n_out: int, dtype=np.float64) -> None:
        super().__init__()
        self.register_param("weight", xp.asarray(rng.standard_normal((n_in, n_out)), dtype=dtype))
        self.register_param("bias", xp.asarray(rng.standard_normal(n_out), dtype=dtype))
        self._x = None

    def forward(self, x):
        self._x = x
        return x @ self.params["weight"] + self.params["bias"]

    def backward(self, grad_out, input_grad=True):
        xp = get_array_module(grad_out)
        xp.matmul(self._x.T, grad_out, out=self.grads["weight"])
        self.grads["bias"][...] = grad_out.sum(axis=0)
        return grad_out @ self.params["weight"].T


def tiny_model(xp, rng, dtype=np.float64) -> Sequential:
    return Sequential(TinyAffine(xp, rng, 3, 5, dtype), TinyAffine(xp, rng, 5, 2, dtype))


def test_copies_values_in_named_parameter_order(xp, rng):
    model = tiny_model(xp, rng)
    before = {name: to_host(mod.params[key]).copy() for name, mod, key in model.named_parameters()}
    flat = FlatParameters(model)
    assert [e.name for e in flat.entries] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [e.offset for e in flat.entries] == [0, 15, 20, 30]
    assert [e.shape for e in flat.entries] == [(3, 5), (5,), (5, 2), (2,)]
    assert flat.size == 32 and flat.params.shape == (32,) and flat.grads.shape == (32,)
    assert flat.nbytes == 32 * 8 and flat.dtype == np.float64
    assert get_array_module(flat.params) is xp
    for e in flat.entries:
        assert isinstance(e, FlatEntry) and e.end == e.offset + e.size
        np.testing.assert_array_equal(to_host(flat.params[e.offset:e.end]).reshape(e.shape), before[e.name])
        np.testing.assert_array_equal(to_host(e.module.params[e.key]), before[e.name])
    assert flat.views_ok()


def test_writes_go_both_ways(xp, rng):
    model = tiny_model(xp, rng)
    flat = FlatParameters(model)
    layer = model[1]
    layer.params["weight"][2, 1] = 7.0
    assert float(flat.params[20 + 2 * 2 + 1]) == 7.0
    layer.grads["bias"][...] = -3.0
    np.testing.assert_array_equal(to_host(flat.grads[30:32]), [-3.0, -3.0])

    flat.params[...] = xp.arange(flat.size, dtype=flat.dtype)
    flat.grads[...] = -xp.arange(flat.size, dtype=flat.dtype)
    for e in flat.entries:
        expected = np.arange(e.offset, e.end, dtype=np.float64).reshape(e.shape)
        np.testing.assert_array_equal(to_host(e.module.params[e.key]), expected)
        np.testing.assert_array_equal(to_host(e.module.grads[e.key]), -expected)


def test_backward_writes_grads_into_the_flat_buffer(xp, rng):
    model = tiny_model(xp, rng)
    flat = FlatParameters(model)
    x = xp.asarray(rng.standard_normal((4, 3)))
    g = xp.asarray(rng.standard_normal((4, 2)))
    h = model[0](x)
    model(x)
    model.backward(g)
    x_h, h_h, g_h = to_host(x), to_host(h), to_host(g)
    w1 = to_host(model[1].params["weight"])
    expected = {
        "1.weight": h_h.T @ g_h,
        "1.bias": g_h.sum(0),
        "0.weight": x_h.T @ (g_h @ w1.T),
        "0.bias": (g_h @ w1.T).sum(0),
    }
    for e in flat.entries:
        np.testing.assert_allclose(to_host(flat.grads[e.offset:e.end]).reshape(e.shape), expected[e.name],
                                   rtol=1e-12)
    assert flat.views_ok()


def test_linear_layer_backward_lands_in_flat_buffer(xp, rng):
    linear = pytest.importorskip("dtrain.nn.linear")
    model = Sequential(linear.Linear(3, 4, rng=rng, dtype=np.float64),
                       linear.Linear(4, 2, rng=rng, dtype=np.float64)).to(xp)
    flat = FlatParameters(model, align=4)
    x = xp.asarray(rng.standard_normal((5, 3)))
    g = xp.asarray(rng.standard_normal((5, 2)))
    model(x)
    model.backward(g)
    assert flat.views_ok()
    assert float(xp.abs(flat.grads).sum()) > 0
    h = to_host(model[0](x))
    e = next(e for e in flat.entries if e.name == "1.weight")
    np.testing.assert_allclose(to_host(flat.grads[e.offset:e.end]).reshape(e.shape), to_host(g).T @ h,
                               rtol=1e-12)


def test_alignment_pads_with_zeros(xp, rng):
    model = tiny_model(xp, rng)
    flat = FlatParameters(model, align=8)
    assert [e.offset for e in flat.entries] == [0, 16, 24, 40]
    assert flat.size == 48 and flat.align == 8
    offsets = [e.offset for e in flat.entries]
    assert offsets == sorted(offsets)
    used = np.zeros(flat.size, dtype=bool)
    for e in flat.entries:
        used[e.offset:e.end] = True
    model(xp.asarray(rng.standard_normal((4, 3))))
    model.backward(xp.asarray(rng.standard_normal((4, 2))))
    assert np.all(to_host(flat.params)[~used] == 0) and np.all(to_host(flat.grads)[~used] == 0)
    assert np.all(to_host(flat.grads)[used] != 0)


def test_rebinding_is_detected(rng):
    model = tiny_model(np, rng)
    flat = FlatParameters(model)
    model[0].grads["weight"] = model[0].grads["weight"].copy()
    assert not flat.views_ok()
    assert flat.broken_views() == ["grads.0.weight"]
    with pytest.raises(RuntimeError, match=r"grads\.0\.weight .*write in place"):
        flat.check_views()


def test_view_of_the_wrong_slice_is_detected(rng):
    model = tiny_model(np, rng)
    flat = FlatParameters(model)
    model[1].params["bias"] = flat.params[29:31]
    assert flat.broken_views() == ["params.1.bias"]


def test_module_to_after_flattening_detaches_and_allows_reflattening(rng):
    model = tiny_model(np, rng)
    flat = FlatParameters(model)
    model.to(np, np.float32)
    assert len(flat.broken_views()) == 8
    again = FlatParameters(model)
    assert again.views_ok() and again.dtype == np.float32


def test_flattening_twice_is_an_error(rng):
    model = tiny_model(np, rng)
    first = FlatParameters(model)
    with pytest.raises(RuntimeError, match="already lives in another FlatParameters"):
        FlatParameters(model)
    del first  # once no one holds the first buffer object, flattening again is harmless
    assert FlatParameters(model).views_ok()


def test_mixed_dtypes_are_rejected(rng):
    model = Sequential(TinyAffine(np, rng, 2, 3, np.float64), TinyAffine(np, rng, 3, 1, np.float32))
    with pytest.raises(TypeError, match=r"'1\.weight' is a numpy float32 .*\.to\(xp, dtype\)"):
        FlatParameters(model)


def test_tied_parameters_are_rejected(rng):
    a, b = TinyAffine(np, rng, 3, 3), TinyAffine(np, rng, 3, 3)
    b.params["weight"] = a.params["weight"]
    with pytest.raises(ValueError, match="tied parameters"):
        FlatParameters(Sequential(a, b))


@pytest.mark.parametrize(
    "model, align, error, match",
    [
        (Sequential(), 1, ValueError, "no parameters"),
        ("not a module", 1, TypeError, "needs a dtrain Module"),
        (None, 0, ValueError, "align must be an int >= 1"),
        (None, 2.0, ValueError, "align must be an int >= 1"),
    ],
)
def test_bad_arguments(rng, model, align, error, match):
    model = tiny_model(np, rng) if model is None else model
    with pytest.raises(error, match=match):
        FlatParameters(model, align=align)
