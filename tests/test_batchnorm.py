"""BatchNorm1d/2d: PyTorch parity in train and eval, running statistics, finite differences,
synchronized statistics through ``stats_reducer``, errors."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from layer_checks import TORCH_TOL, assert_matches_torch, layer_gradcheck, rel_err

from dtrain.backend import to_host
from dtrain.nn.batchnorm import BatchNorm1d, BatchNorm2d

CASES = [  # (ours, torch's, input shape)
    (BatchNorm1d, torch.nn.BatchNorm1d, (3, 4)),  # N=2 makes the input gradient ill-conditioned
    (BatchNorm1d, torch.nn.BatchNorm1d, (9, 5)),
    (BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 6)),
    (BatchNorm2d, torch.nn.BatchNorm2d, (1, 3, 4, 5)),
    (BatchNorm2d, torch.nn.BatchNorm2d, (6, 4, 3, 3)),
]
IDS = ["1d_3x4", "1d_9x5", "1d_4x3x6", "2d_batch1", "2d_6x4x3x3"]


def randomized(layer, rng):
    """Give a fresh layer non-trivial affine parameters so their gradients matter."""
    for key, value in layer.params.items():
        value[...] = rng.normal(size=value.shape) + (1.0 if key == "weight" else 0.0)
    return layer


@pytest.mark.parametrize("ours,theirs,shape", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch(xp, rng, ours, theirs, shape, dtype, affine, training):
    c = shape[1]
    layer = randomized(ours(c, affine=affine, dtype=dtype), rng)
    layer.buffers["running_mean"][...] = rng.normal(size=c)
    layer.buffers["running_var"][...] = rng.uniform(0.5, 2.0, size=c)
    layer.to(xp).train(training)
    x = (2 * rng.normal(size=shape) + 1).astype(dtype)
    assert_matches_torch(layer, theirs(c, affine=affine), x, xp, rng)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_running_statistics_follow_torch_over_steps(xp, rng, momentum, eps, dtype):
    ours = randomized(BatchNorm2d(3, eps=eps, momentum=momentum, dtype=dtype), rng).to(xp)
    theirs = torch.nn.BatchNorm2d(3, eps=eps, momentum=momentum).to(getattr(torch, np.dtype(dtype).name))
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    tol = TORCH_TOL[np.dtype(dtype)]
    for step in range(4):
        x = (rng.normal(size=(5, 3, 2, 3)) * (step + 1) + step).astype(dtype)
        y = ours.forward(xp.asarray(x))
        yt = theirs(torch.from_numpy(x))
        assert rel_err(y, yt) < tol
        for name, buf in theirs.named_buffers():
            assert rel_err(ours.buffers[name], buf) < tol, name
    assert int(ours.buffers["num_batches_tracked"]) == 4
    ours.eval()
    theirs.eval()
    x = rng.normal(size=(2, 3, 2, 2)).astype(dtype)
    assert rel_err(ours.forward(xp.asarray(x)), theirs(torch.from_numpy(x))) < tol


def test_eval_uses_running_statistics_and_leaves_them_alone(xp, rng):
    layer = BatchNorm1d(4, dtype=np.float64).to(xp)
    x = xp.asarray(rng.normal(size=(8, 4)) * 3 + 5)
    train_out = layer.forward(x)
    before = layer.state_dict()
    layer.eval()
    eval_out = layer.forward(x)
    after = layer.state_dict()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    mean, var = before["running_mean"], before["running_var"]
    expected = (to_host(x) - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(to_host(eval_out), expected, rtol=1e-12)
    # training output is normalized with the batch's own statistics
    np.testing.assert_allclose(to_host(train_out).mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(to_host(train_out).var(axis=0), 1 / (1 + 1e-5 / to_host(x).var(axis=0)), rtol=1e-9)


def test_variance_of_large_mean_data_is_accurate_in_float32(rng):
    # E[x^2] - E[x]^2 in float32 would lose ~1e-3 here; the shifted sums must not.
    x64 = 100.0 + rng.normal(size=(64, 3))
    x32 = x64.astype(np.float32)
    layer = BatchNorm1d(3, momentum=1.0)
    layer.forward(x32)
    exact = x32.astype(np.float64).var(axis=0, ddof=1)
    assert rel_err(layer.buffers["running_var"], exact) < 1e-5


@pytest.mark.parametrize("ours,shape", [(BatchNorm1d, (5, 3)), (BatchNorm1d, (3, 2, 4)), (BatchNorm2d, (2, 3, 3, 2))])
@pytest.mark.parametrize("training", [True, False])
def test_finite_differences(xp, rng, ours, shape, training):
    layer = randomized(ours(shape[1], dtype=np.float64), rng).to(xp).train(training)
    layer_gradcheck(layer, xp.asarray(rng.normal(size=shape) * 2 + 1), rng)


class ThreadAllReduce:
    """An all-reduce (sum) among threads, standing in for ranks."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=20)
        self.slots: list = [None] * world

    def reducer(self, rank: int):
        def all_reduce(a):
            self.slots[rank] = a.copy()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].copy())
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            return total

        return all_reduce


@pytest.mark.parametrize("ours,shape", [(BatchNorm1d, (10, 3)), (BatchNorm2d, (6, 2, 3, 3))])
def test_synchronized_statistics_equal_one_big_batch(xp, rng, ours, shape):
    world, c = 2, shape[1]
    full = randomized(ours(c, dtype=np.float64), rng).to(xp)
    ranks = [ours(c, dtype=np.float64).to(xp) for _ in range(world)]
    comm = ThreadAllReduce(world)
    for rank, layer in enumerate(ranks):
        layer.load_state_dict(full.state_dict())
        layer.stats_reducer = comm.reducer(rank)
    splits = [slice(0, shape[0] // 3), slice(shape[0] // 3, shape[0])]  # unequal local batches
    for step in range(3):  # later steps shift by a non-zero running mean
        x = xp.asarray(rng.normal(size=shape) * 2 + 3)
        g = xp.asarray(rng.normal(size=shape))
        y_full = full.forward(x)
        dx_full = full.backward(g)
        results = [None] * world

        def run(rank):
            layer = ranks[rank]
            results[rank] = (layer.forward(x[splits[rank]]), layer.backward(g[splits[rank]]))

        threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for rank, (y, dx) in enumerate(results):
            assert rel_err(y, y_full[splits[rank]]) < 1e-10
            assert rel_err(dx, dx_full[splits[rank]]) < 1e-10
        for key in full.grads:  # parameter gradients stay local: they add up to the full batch's
            assert rel_err(sum(layer.grads[key] for layer in ranks), full.grads[key]) < 1e-10
        for layer in ranks:
            for key in full.buffers:
                assert rel_err(layer.buffers[key], full.buffers[key]) < 1e-10, key


def test_reducer_returning_wrong_shape_is_reported(rng):
    layer = BatchNorm1d(3, dtype=np.float64)
    layer.stats_reducer = lambda a: a[:3]
    with pytest.raises(ValueError, match=r"BatchNorm1d.*stats_reducer must return .* length 9, got shape \(3,\)"):
        layer.forward(rng.normal(size=(4, 3)))


def test_input_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3.*expects input of shape \(N, C, H, W\), got shape \(2, 3\)"):
        BatchNorm2d(3).forward(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(4.*expects 4 channels \(axis 1\), got input of shape \(2, 3\)"):
        BatchNorm1d(4).forward(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(TypeError, match=r"BatchNorm1d.*float64 input.*float32"):
        BatchNorm1d(3).forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"more than one value per channel.*\(1, 3\).*\.eval\(\)"):
        BatchNorm1d(3).forward(np.ones((1, 3), dtype=np.float32))
    BatchNorm1d(3).eval().forward(np.ones((1, 3), dtype=np.float32))  # fine with running statistics
    with pytest.raises(RuntimeError, match="backward called before forward"):
        BatchNorm1d(3).backward(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"per-sample shape \(C, H, W\) with C=3, got \(4, 2, 2\)"):
        BatchNorm2d(3).output_shape((4, 2, 2))
    assert BatchNorm2d(3).output_shape((3, 5, 5)) == (3, 5, 5)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"num_features": 0}, "num_features"), ({"num_features": 3, "eps": 0.0}, "eps"),
     ({"num_features": 3, "momentum": 1.5}, "momentum")],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=f"BatchNorm2d: {match}"):
        BatchNorm2d(**kwargs)


def test_state_dict_keys_match_torch():
    assert list(BatchNorm2d(3).state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    assert list(BatchNorm1d(3, affine=False).state_dict()) == list(torch.nn.BatchNorm1d(3, affine=False).state_dict())
