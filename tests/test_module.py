"""Sequential: call order, backward hooks, PyTorch state_dict names and load round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import rel_err

from dtrain.backend import to_host
from dtrain.nn.activation import ReLU, Tanh
from dtrain.nn.batchnorm import BatchNorm1d
from dtrain.nn.conv import Conv2d
from dtrain.nn.dropout import Dropout
from dtrain.nn.flat import FlatParameters
from dtrain.nn.flatten import Flatten
from dtrain.nn.linear import Linear
from dtrain.nn.module import Module, Sequential, StateDictMismatchError
from dtrain.nn.pool import MaxPool2d


class Recorder(Module):
    """Adds ``offset`` and logs every call, to observe the container's call order."""

    def __init__(self, name: str, log: list, offset: float) -> None:
        super().__init__()
        self.name, self.log, self.offset = name, log, offset

    def forward(self, x):
        self.log.append(("forward", self.name))
        return x + self.offset

    def backward(self, grad_out, input_grad=True):
        self.log.append(("backward", self.name))
        return grad_out * 2


def test_forward_and_backward_order_and_hooks():
    log: list = []
    layers = [Recorder(name, log, offset) for name, offset in (("a", 1.0), ("b", 10.0), ("c", 100.0))]
    model = Sequential(*layers)
    model.register_backward_hook(lambda i, layer: log.append(("hook", i, layer.name)))
    assert model.forward(np.zeros(1)).tolist() == [111.0]
    assert model.backward(np.ones(1)).tolist() == [8.0]
    assert log == [
        ("forward", "a"), ("forward", "b"), ("forward", "c"),
        ("backward", "c"), ("hook", 2, "c"),
        ("backward", "b"), ("hook", 1, "b"),
        ("backward", "a"), ("hook", 0, "a"),
    ]
    assert model[1] is layers[1] and len(model) == 3


def test_relu_is_applied_by_the_layer_before_or_over_a_fresh_output_only(rng):
    """A ReLU right after Conv2d or Linear is applied by that layer (``forward_relu``, the
    ReLU adopts the output); one after a pooling layer (a fresh output nobody keeps) writes
    over its input; one after the caller's input, another ReLU or Tanh (whose backward reads
    its output) computes into new memory. In backward, Conv2d and MaxPool2d run the ReLU
    right before them, which keeps nothing. The results are PyTorch's."""
    calls: list[tuple[str, int]] = []

    class SpyReLU(ReLU):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index

        def forward(self, a):
            calls.append(("forward", self.index))
            return super().forward(a)

        def forward_owned(self, a):
            calls.append(("owned", self.index))
            return super().forward_owned(a)

        def adopt(self, y):
            calls.append(("adopt", self.index))
            return super().adopt(y)

        def release(self):
            calls.append(("release", self.index))
            super().release()

        def backward(self, grad_out, input_grad=True):
            calls.append(("backward", self.index))
            return super().backward(grad_out, input_grad)

    model = Sequential(SpyReLU(0), Conv2d(2, 3, 3, padding=1, rng=rng, dtype=np.float64), SpyReLU(2), SpyReLU(3),
                       MaxPool2d(2), SpyReLU(5), Tanh(), SpyReLU(7), Flatten(), Linear(12, 4, rng=rng, dtype=np.float64),
                       SpyReLU(10))
    x = rng.normal(size=(3, 2, 4, 4))
    x_before = x.copy()
    y = model.forward(x)
    assert calls == [("forward", 0), ("release", 0), ("adopt", 2), ("forward", 3), ("release", 3), ("owned", 5),
                     ("forward", 7), ("adopt", 10)]
    np.testing.assert_array_equal(x, x_before)
    g = rng.normal(size=y.shape)
    hooked: list[int] = []
    model.register_backward_hook(lambda index, layer: hooked.append(index))
    calls.clear()
    gx = model.backward(g.copy())
    # The ReLUs before Conv2d and MaxPool2d run inside their backward; the hooks still see them.
    assert calls == [("backward", i) for i in (10, 7, 5, 2)]
    assert hooked == list(range(len(model) - 1, -1, -1))

    theirs = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(2, 3, 3, padding=1).double(), torch.nn.ReLU(),
                                 torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.ReLU(), torch.nn.Tanh(),
                                 torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(12, 4).double(), torch.nn.ReLU())
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    tx = torch.from_numpy(x_before).requires_grad_()
    ty = theirs(tx)
    ty.backward(torch.from_numpy(g))
    assert rel_err(y, ty) < 1e-12
    assert rel_err(gx, tx.grad) < 1e-12
    for (name, layer, key), (_, theirs_param) in zip(model.named_parameters(), theirs.named_parameters()):
        assert rel_err(layer.grads[key], theirs_param.grad) < 1e-12, name


def test_relu_on_an_owned_input_writes_over_it(rng):
    x = rng.normal(size=(3, 4))
    expected = np.maximum(x, 0)
    relu = ReLU()
    y = relu.forward_owned(x)
    assert y is x
    np.testing.assert_array_equal(y, expected)
    g = rng.normal(size=x.shape)
    np.testing.assert_array_equal(relu.backward(g.copy()), g * (expected > 0))


def test_without_the_input_gradient_backward_stops_at_the_first_layer_with_parameters(rng):
    from dtrain.nn.flatten import Flatten

    log: list = []
    front = Recorder("front", log, 0.0)  # no parameters, before the first that has some
    model = Sequential(front, Flatten(), Linear(4, 3, rng=rng, dtype=np.float64), ReLU(),
                       Linear(3, 2, rng=rng, dtype=np.float64))
    hooks: list = []
    model.register_backward_hook(lambda i, layer: hooks.append(i))
    x, g = rng.normal(size=(5, 2, 2)), rng.normal(size=(5, 2))
    model.forward(x)
    full = model.backward(g.copy())
    grads = [{k: v.copy() for k, v in model[i].grads.items()} for i in (2, 4)]
    log.clear()
    hooks.clear()
    model.forward(x)
    assert model.backward(g.copy(), input_grad=False) is None
    assert ("backward", "front") not in log and hooks == [4, 3, 2, 1, 0]  # every hook still runs
    for i, expected in zip((2, 4), grads):
        for key, grad in model[i].grads.items():
            np.testing.assert_array_equal(grad, expected[key])
    assert full.shape == (5, 2, 2)


def test_hook_sees_the_layer_gradients_already_written(rng):
    model = Sequential(Linear(3, 4, rng=rng, dtype=np.float64), ReLU(), Linear(4, 2, rng=rng, dtype=np.float64))
    seen = {}
    model.register_backward_hook(lambda i, layer: seen.setdefault(i, {k: g.copy() for k, g in layer.grads.items()}))
    model.forward(rng.normal(size=(5, 3)))
    model.backward(rng.normal(size=(5, 2)))
    assert sorted(seen) == [0, 1, 2] and seen[1] == {}
    for i in (0, 2):
        for key, grad in model[i].grads.items():
            np.testing.assert_array_equal(seen[i][key], grad)
            assert np.abs(grad).sum() > 0


def make_pair(rng):
    """The same network in dtrain and in torch (layers that have state, and some that have none)."""
    ours = Sequential(
        Linear(6, 5, rng=rng, dtype=np.float64), BatchNorm1d(5, dtype=np.float64), ReLU(),
        Dropout(0.5, salt=3), Linear(5, 3, bias=False, rng=rng, dtype=np.float64),
    )
    theirs = torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(),
        torch.nn.Dropout(0.5), torch.nn.Linear(5, 3, bias=False),
    ).double()
    return ours, theirs


def test_state_dict_names_match_torch(rng):
    ours, theirs = make_pair(rng)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert sorted(ours_sd) == sorted(theirs_sd)
    assert "0.weight" in ours_sd and "1.running_mean" in ours_sd and "1.num_batches_tracked" in ours_sd
    for key, value in theirs_sd.items():
        assert ours_sd[key].shape == tuple(value.shape), key
        assert ours_sd[key].dtype == value.numpy().dtype, key
    assert [name for name, _, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]


def test_loading_torch_weights_gives_torch_outputs(xp, rng):
    ours, theirs = make_pair(rng)
    theirs.train()
    theirs(torch.randn(8, 6, dtype=torch.float64))  # move the running statistics off their defaults
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    ours.to(xp).eval()
    theirs.eval()
    x = rng.normal(size=(4, 6))
    assert rel_err(ours.forward(xp.asarray(x)), theirs(torch.from_numpy(x))) < 1e-12


def test_load_state_dict_round_trip_and_errors(rng):
    source, _ = make_pair(rng)
    source.forward(rng.normal(size=(4, 6)))  # running statistics and num_batches_tracked change
    target, _ = make_pair(np.random.default_rng(99))
    target.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[key], value)
    bad = source.state_dict()
    bad["4.weight"] = np.zeros((3, 6))
    with pytest.raises(StateDictMismatchError, match=r"'4.weight': \(3, 6\) given, model \(3, 5\)"):
        target.load_state_dict(bad)
    del bad["1.running_var"]
    with pytest.raises(StateDictMismatchError, match=r"missing: \['1.running_var'\].*'4.weight'"):
        target.load_state_dict(bad, source="the test's dict")


def test_layers_write_into_flat_gradient_buffers(xp, rng):
    model, _ = make_pair(rng)
    model.to(xp)
    flat = FlatParameters(model)
    model.forward(xp.asarray(rng.normal(size=(4, 6))))
    model.backward(xp.asarray(rng.normal(size=(4, 3))))
    flat.check_views()
    for entry in flat.entries:
        np.testing.assert_array_equal(
            to_host(flat.grads[entry.offset:entry.end]).reshape(entry.shape),
            to_host(entry.module.grads[entry.key]),
        )
    assert float(abs(flat.grads).sum()) > 0
