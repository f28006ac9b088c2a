"""SoftmaxCrossEntropy and accuracy counting: PyTorch parity, stability, finite differences, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from layer_checks import TORCH_TOL, check_against_finite_differences, rel_err

from dtrain.backend import to_host
from dtrain.nn.loss import SoftmaxCrossEntropy, accuracy_counts


@pytest.mark.parametrize("n,c", [(1, 2), (7, 10), (32, 3)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_matches_torch(xp, rng, n, c, dtype, scale):
    logits = (3 * rng.normal(size=(n, c))).astype(dtype)
    labels = rng.integers(0, c, size=n)
    loss_fn = SoftmaxCrossEntropy()
    loss = loss_fn.forward(xp.asarray(logits), xp.asarray(labels))
    grad = loss_fn.backward(scale)
    lt = torch.tensor(logits, requires_grad=True)
    expected = F.cross_entropy(lt, torch.from_numpy(labels))
    (scale * expected).backward()
    assert loss.shape == () and loss.dtype == dtype and grad.dtype == dtype
    assert rel_err(loss, expected) < TORCH_TOL[np.dtype(dtype)]
    assert rel_err(grad, lt.grad) < TORCH_TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_huge_logits_stay_finite(xp, dtype):
    logits = np.array([[1e4, -1e4, 0.0], [-5e3, 5e3, 5e3]], dtype=dtype)
    labels = np.array([1, 2])
    loss_fn = SoftmaxCrossEntropy()
    loss = float(loss_fn.forward(xp.asarray(logits), xp.asarray(labels)))
    expected = float(F.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels)))
    assert np.isfinite(loss) and abs(loss - expected) / expected < 1e-6
    assert np.isfinite(to_host(loss_fn.backward())).all()


def test_finite_differences(xp, rng):
    logits = xp.asarray(rng.normal(size=(5, 4)))
    labels = xp.asarray(rng.integers(0, 4, size=5))
    loss_fn = SoftmaxCrossEntropy()
    loss_fn.forward(logits, labels)
    analytic = {"logits": loss_fn.backward(2.0).copy()}
    check_against_finite_differences(
        lambda: 2.0 * float(loss_fn.forward(logits, labels)), {"logits": logits}, analytic, rng, samples=10
    )


def test_accuracy_counts(xp):
    logits = xp.asarray(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.5, 0.4]]))
    labels = xp.asarray(np.array([1, 1, 1, 0]))
    assert accuracy_counts(logits, labels) == (3, 4)
    loss_fn = SoftmaxCrossEntropy()
    loss_fn.forward(logits, labels)
    assert loss_fn.num_correct() == 3


@pytest.mark.parametrize(
    "logits,labels,match",
    [
        (np.zeros(3), np.zeros(3, dtype=int), r"logits must be 2-D \(N, C\), got shape \(3,\)"),
        (np.zeros((3, 2)), np.zeros(2, dtype=int), r"one class index per row of logits \(3\), got shape \(2,\)"),
        (np.zeros((3, 2)), np.zeros((3, 1), dtype=int), r"got shape \(3, 1\)"),
        (np.zeros((3, 2)), np.zeros(3), "labels must be integer class indices, got dtype float64"),
        (np.zeros((3, 2)), np.array([0, 2, 1]), r"labels must lie in \[0, 2\) for 2 classes, got values in \[0, 2\]"),
        (np.zeros((3, 2)), np.array([0, -1, 1]), r"got values in \[-1, 1\]"),
        (np.zeros((0, 2)), np.zeros(0, dtype=int), r"empty batch"),
    ],
)
def test_bad_inputs_are_explained(logits, labels, match):
    with pytest.raises(ValueError, match=f"SoftmaxCrossEntropy: .*{match}"):
        SoftmaxCrossEntropy().forward(logits, labels)


def test_call_order_errors():
    with pytest.raises(RuntimeError, match="backward called before forward"):
        SoftmaxCrossEntropy().backward()
    with pytest.raises(RuntimeError, match="num_correct called before forward"):
        SoftmaxCrossEntropy().num_correct()
    with pytest.raises(ValueError, match="accuracy_counts: labels must lie"):
        accuracy_counts(np.zeros((1, 2)), np.array([5]))
