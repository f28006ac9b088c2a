"""A small CNN with every layer kind, end to end: finite differences and the same torch network.

Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d -> Conv2d -> LRN -> Tanh -> Flatten -> Linear
-> Dropout -> Linear -> SoftmaxCrossEntropy, in float64. The first convolution has no bias:
in front of a training-mode BatchNorm its gradient is exactly zero, so only round-off to compare.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_checks import check_against_finite_differences, rel_err

from dtrain.backend import to_host
from dtrain.nn.activation import ReLU, Tanh
from dtrain.nn.batchnorm import BatchNorm2d
from dtrain.nn.conv import Conv2d
from dtrain.nn.dropout import Dropout
from dtrain.nn.flatten import Flatten
from dtrain.nn.linear import Linear
from dtrain.nn.loss import SoftmaxCrossEntropy
from dtrain.nn.lrn import LocalResponseNorm
from dtrain.nn.module import Sequential
from dtrain.nn.pool import MaxPool2d

BATCH, CLASSES = 3, 5
INPUT = (2, 8, 8)  # C, H, W
LRN = {"size": 3, "alpha": 0.3, "beta": 0.75, "k": 1.5}  # a strong normalization, so it matters


def dtrain_net(p: float, rng: np.random.Generator) -> Sequential:
    kw = {"rng": rng, "dtype": np.float64}
    return Sequential(
        Conv2d(2, 4, 3, padding=1, bias=False, **kw), BatchNorm2d(4, dtype=np.float64), ReLU(), MaxPool2d(2),
        Conv2d(4, 6, 3, padding=1, **kw), LocalResponseNorm(**LRN), Tanh(), Flatten(),
        Linear(6 * 4 * 4, 10, **kw), Dropout(p, seed=1, salt=9), Linear(10, CLASSES, **kw),
    )


def torch_net(p: float) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.LocalResponseNorm(**LRN), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 10), torch.nn.Dropout(p), torch.nn.Linear(10, CLASSES),
    ).double()


def randomize_batchnorm(model: Sequential, rng: np.random.Generator) -> None:
    """Non-trivial affine parameters and running statistics for the BatchNorm layer."""
    bn = model[1]
    bn.params["weight"][...] = rng.uniform(0.5, 1.5, size=4)
    bn.params["bias"][...] = rng.normal(size=4)
    bn.buffers["running_mean"][...] = rng.normal(size=4)
    bn.buffers["running_var"][...] = rng.uniform(0.5, 2.0, size=4)


def data(rng: np.random.Generator, xp) -> tuple:
    x = xp.asarray(rng.normal(size=(BATCH, *INPUT)))
    labels = xp.asarray(rng.integers(0, CLASSES, size=BATCH))
    return x, labels


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("training", [True, False])
def test_finite_differences_for_every_parameter(xp, rng, p, training):
    model = dtrain_net(p, rng)
    randomize_batchnorm(model, rng)
    model.to(xp).train(training)
    model.set_batch_context(4, np.array([10, 3, 7]))  # a fixed dropout mask
    x, labels = data(rng, xp)
    loss_fn = SoftmaxCrossEntropy()

    def loss() -> float:
        return float(loss_fn.forward(model.forward(x), labels))

    loss()
    analytic = {"input": model.backward(loss_fn.backward()).copy()}
    arrays = {"input": x}
    for name, layer, key in model.named_parameters():
        analytic[name] = layer.grads[key].copy()
        arrays[name] = layer.params[key]
    assert len(arrays) == 10
    check_against_finite_differences(loss, arrays, analytic, rng, samples=5)


@pytest.mark.parametrize("training,p", [(True, 0.0), (False, 0.5)])
def test_matches_the_same_torch_network(xp, rng, training, p):
    ours = dtrain_net(p, rng)
    randomize_batchnorm(ours, rng)
    theirs = torch_net(p)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    ours.to(xp).train(training)
    theirs.train(training)
    x, labels = data(rng, xp)
    loss_fn = SoftmaxCrossEntropy()
    loss = loss_fn.forward(ours.forward(x), labels)
    dx = ours.backward(loss_fn.backward())

    xt = torch.tensor(to_host(x), requires_grad=True)
    lt = torch.from_numpy(to_host(labels))
    loss_t = F.cross_entropy(theirs(xt), lt)
    loss_t.backward()

    assert rel_err(loss, loss_t) < 1e-10
    assert rel_err(dx, xt.grad) < 1e-10
    torch_params = dict(theirs.named_parameters())
    names = [name for name, _, _ in ours.named_parameters()]
    assert names == list(torch_params)
    for name, layer, key in ours.named_parameters():
        assert rel_err(layer.grads[key], torch_params[name].grad) < 1e-10, name
    for name, buf in theirs.named_buffers():
        assert rel_err(ours.state_dict()[name], buf) < 1e-10, name
