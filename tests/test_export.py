"""Weights move between dtrain and PyTorch unchanged: same logits on both sides in float64."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import safetensors.torch
import torch

from dtrain.export import (
    WeightFileError,
    export_weights,
    import_weights,
    read_weights,
    to_torch_sequential,
    write_weights,
)
from dtrain.nn.activation import LeakyReLU, ReLU, Sigmoid, Tanh
from dtrain.nn.batchnorm import BatchNorm1d, BatchNorm2d
from dtrain.nn.conv import Conv2d
from dtrain.nn.dropout import Dropout
from dtrain.nn.flatten import Flatten
from dtrain.nn.linear import Linear
from dtrain.nn.lrn import LocalResponseNorm
from dtrain.nn.module import Module, Sequential, StateDictMismatchError
from dtrain.nn.pool import AvgPool2d, MaxPool2d

FORMATS = [".pt", ".safetensors"]
INPUT = (3, 8, 8)


def dtrain_model(seed: int, dtype=np.float64, dropout: float = 0.3) -> Sequential:
    """Every layer type; (3, 8, 8) -> 5 outputs."""
    rng = np.random.default_rng(seed)
    kw = dict(rng=rng, dtype=dtype)
    return Sequential(
        Conv2d(3, 4, 3, padding=1, **kw),
        BatchNorm2d(4, momentum=0.2, dtype=dtype),
        ReLU(),
        LocalResponseNorm(3, alpha=0.5, beta=0.7, k=1.5),
        MaxPool2d(2),                                          # (4, 4, 4)
        Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), bias=False, **kw),  # (6, 4, 2)
        LeakyReLU(0.1),
        AvgPool2d(2, stride=1, padding=1),                     # (6, 5, 3)
        Flatten(),
        Linear(90, 16, **kw),
        BatchNorm1d(16, eps=1e-3, dtype=dtype),
        Tanh(),
        Dropout(dropout),
        Linear(16, 5, **kw),
        Sigmoid(),
    )


def torch_model(dropout: float = 0.3) -> torch.nn.Sequential:
    """The same network written directly in PyTorch (float64)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=0.2),
        nn.ReLU(),
        nn.LocalResponseNorm(3, alpha=0.5, beta=0.7, k=1.5),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 0), bias=False),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2, stride=1, padding=1),
        nn.Flatten(),
        nn.Linear(90, 16),
        nn.BatchNorm1d(16, eps=1e-3),
        nn.Tanh(),
        nn.Dropout(dropout),
        nn.Linear(16, 5),
        nn.Sigmoid(),
    ).double()


def batch(seed: int, n: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *INPUT))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def warm_up_dtrain(model: Sequential) -> None:
    """Training forwards so BatchNorm running statistics (and counters) are not the defaults."""
    model.train()
    for i in range(3):
        model.forward((batch(10 + i) * (i + 1) + 0.5).astype(model.dtype))
    model.eval()


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("suffix", FORMATS)
def test_torch_weights_into_dtrain(tmp_path, suffix):
    torch.manual_seed(0)
    twin = torch_model()
    with torch.no_grad():  # training passes move the running statistics away from 0/1
        for i in range(3):
            twin(torch.from_numpy(batch(20 + i) * 2 + 1))
    twin.eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(twin.state_dict(), path)
    else:
        safetensors.torch.save_file(twin.state_dict(), path)

    model = dtrain_model(seed=1)
    import_weights(model, path)
    model.eval()
    assert float(model[1].buffers["num_batches_tracked"]) == 3
    np.testing.assert_array_equal(model.state_dict()["10.running_var"], twin[10].running_var.numpy())
    x = batch(0)
    assert rel_err(model.forward(x), torch_logits(twin, x)) < 1e-10


@pytest.mark.parametrize("suffix", FORMATS)
def test_dtrain_weights_into_torch(tmp_path, suffix):
    model = dtrain_model(seed=2)
    warm_up_dtrain(model)
    path = export_weights(model, tmp_path / f"weights{suffix}")
    state = torch.load(path, weights_only=True) if suffix == ".pt" else safetensors.torch.load_file(path)

    twin = torch_model()
    twin.load_state_dict(state)  # strict: exactly torch's names, shapes and buffers
    twin.eval()
    assert int(twin[1].num_batches_tracked) == 3
    x = batch(1)
    assert rel_err(torch_logits(twin, x), model.forward(x)) < 1e-10


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.blas
def test_file_round_trip_keeps_names_dtypes_and_values(tmp_path, suffix):
    model = dtrain_model(seed=3, dtype=np.float32)
    warm_up_dtrain(model)
    path = export_weights(model, tmp_path / f"w{suffix}")
    back = read_weights(path)
    expected = model.state_dict()
    assert set(back) == set(expected)
    for name, value in expected.items():
        assert (back[name].dtype, back[name].shape) == (value.dtype, value.shape), name
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    other = dtrain_model(seed=4, dtype=np.float32)
    import_weights(other, path)
    other.eval()
    x = batch(2).astype(np.float32)
    np.testing.assert_array_equal(other.forward(x), model.forward(x))


def test_to_torch_sequential_matches_layers_and_outputs():
    model = dtrain_model(seed=5, dropout=0.0)
    warm_up_dtrain(model)
    twin = to_torch_sequential(model)
    assert str(twin) == str(torch_model(dropout=0.0))  # same layer types and hyperparameters
    assert not twin.training and all(p.dtype == torch.float64 for p in twin.parameters())
    x = batch(3)
    assert rel_err(torch_logits(twin, x), model.forward(x)) < 1e-10
    # Training mode: batch statistics and the running-statistics update agree as well.
    model.train()
    twin.train()
    assert rel_err(torch_logits(twin, x), model.forward(x)) < 1e-10
    np.testing.assert_allclose(twin[10].running_mean.numpy(), model[10].buffers["running_mean"], rtol=1e-12)
    assert int(twin[1].num_batches_tracked) == int(model[1].buffers["num_batches_tracked"]) == 4


def test_to_torch_sequential_float32_and_nested():
    model = Sequential(Sequential(Linear(4, 3, dtype=np.float32), ReLU()), Linear(3, 2, dtype=np.float32))
    twin = to_torch_sequential(model)
    assert set(twin.state_dict()) == {"0.0.weight", "0.0.bias", "1.weight", "1.bias"}
    assert twin[1].weight.dtype == torch.float32
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(torch_logits(twin, x), model.forward(x), rtol=1e-5, atol=1e-6)


def test_unknown_layer_has_no_twin():
    class Custom(Module):
        pass

    with pytest.raises(TypeError, match=r"layer model\.1 \(Custom\) has no PyTorch twin"):
        to_torch_sequential(Sequential(ReLU(), Custom()))


@pytest.mark.parametrize("suffix", FORMATS)
def test_mismatched_model_is_rejected_with_every_problem(tmp_path, suffix):
    path = export_weights(dtrain_model(seed=6), tmp_path / f"w{suffix}")
    smaller = Sequential(Conv2d(3, 5, 3, padding=1, dtype=np.float64), BatchNorm2d(5, dtype=np.float64))
    before = smaller.state_dict()
    with pytest.raises(StateDictMismatchError) as err:
        import_weights(smaller, path)
    msg = str(err.value)
    assert str(path) in msg
    assert "'0.weight': (4, 3, 3, 3) given, model (5, 3, 3, 3)" in msg
    assert "'13.weight'" in msg and "not in the model" in msg
    for name, value in smaller.state_dict().items():  # nothing was copied
        np.testing.assert_array_equal(value, before[name])


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown weight file type '\.npz'"):
        write_weights({}, tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_weights(tmp_path / "missing.pt")
    nested = tmp_path / "nested.pt"
    torch.save({"model": {"0.weight": torch.zeros(2)}, "epoch": 3}, nested)
    with pytest.raises(WeightFileError, match=r"entries \['epoch', 'model'\] are not tensors"):
        read_weights(nested)
    good = export_weights(dtrain_model(seed=7), tmp_path / "w.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(WeightFileError, match="truncated.pt cannot be loaded"):
        read_weights(truncated)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightFileError, match="junk.safetensors is not a readable safetensors file"):
        read_weights(junk)
    bf16 = tmp_path / "bf16.pt"
    torch.save({"w": torch.ones(3, dtype=torch.bfloat16)}, bf16)
    assert read_weights(bf16)["w"].dtype == np.float32


def test_without_torch_safetensors_still_works(tmp_path, monkeypatch):
    model = dtrain_model(seed=8)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match="needs PyTorch.*safetensors"):
        export_weights(model, tmp_path / "w.pt")
    with pytest.raises(ImportError, match="pip install torch"):
        to_torch_sequential(model)
    path = export_weights(model, tmp_path / "w.safetensors")
    other = dtrain_model(seed=9)
    import_weights(other, path)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[name], value)
