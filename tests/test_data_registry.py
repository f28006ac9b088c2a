"""load_dataset's name/split/option checks, the Dataset invariants, and the synthetic dataset."""
from __future__ import annotations

import numpy as np
import pytest

from dtrain.data import DATASET_NAMES, DataError, Dataset, load_dataset


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; valid names: mnist, fashion_mnist, mnist_sample"):
        load_dataset("cifar", "train", "data")
    assert set(DATASET_NAMES) == {"mnist", "fashion_mnist", "mnist_sample", "kaggle_digits", "synthetic"}


def test_bad_split_and_unknown_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        load_dataset("synthetic", "val", str(tmp_path))
    with pytest.raises(ValueError, match="mnist_sample: unknown option.*image_shape; accepted: none"):
        load_dataset("mnist_sample", "train", str(tmp_path), image_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="synthetic: unknown option.*mirrors; accepted: image_shape"):
        load_dataset("synthetic", "train", str(tmp_path), mirrors=["http://x/"])


def test_options_set_to_none_mean_default(tmp_path):
    data = load_dataset("synthetic", "train", str(tmp_path), size=8, mirrors=None, image_shape=None)
    assert data.images.shape == (8, 1, 28, 28)


def test_synthetic_shape_classes_and_determinism(tmp_path):
    data = load_dataset("synthetic", "train", str(tmp_path), size=64, image_shape=(3, 5, 7), num_classes=4, seed=2)
    assert data.images.shape == (64, 3, 5, 7) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and set(data.labels.tolist()) == {0, 1, 2, 3}
    assert data.num_classes == 4 and data.std == pytest.approx(0.2898, abs=1e-4)
    again = load_dataset("synthetic", "train", str(tmp_path), size=16, image_shape=(3, 5, 7), num_classes=4, seed=2)
    np.testing.assert_array_equal(again.images, data.images[:16])
    np.testing.assert_array_equal(again.labels, data.labels[:16])
    test = load_dataset("synthetic", "test", str(tmp_path), size=64, image_shape=(3, 5, 7), num_classes=4, seed=2)
    assert not np.array_equal(test.images, data.images)
    assert len(load_dataset("synthetic", "train", str(tmp_path))) == 1024


@pytest.mark.parametrize(
    "options, message",
    [({"image_shape": (28, 28)}, "three positive ints"), ({"num_classes": 0}, "num_classes must be an int >= 1"),
     ({"size": 0}, "size must be an int >= 1")],
)
def test_synthetic_rejects_bad_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("synthetic", "train", str(tmp_path), **options)


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((2, 28, 28), np.uint8), None, r"shape \(N, C, H, W\)"),
        (np.zeros((2, 1, 2, 2), np.int32), None, "uint8 or float32"),
        (np.zeros((2, 1, 2, 2), np.uint8), np.zeros(3, np.int64), r"labels must be int64 of shape \(2,\)"),
        (np.zeros((2, 1, 2, 2), np.uint8), np.zeros(2, np.int32), "labels must be int64"),
        (np.zeros((2, 1, 2, 2), np.uint8), np.array([0, 10]), r"label 10 of sample 1 is outside \[0, 10\)"),
    ],
)
def test_dataset_checks_its_arrays(images, labels, message):
    with pytest.raises(DataError, match=message):
        Dataset(images, labels, "toy", 10, 0.5, 0.25)


def test_head_is_a_prefix():
    data = Dataset(np.arange(12, dtype=np.uint8).reshape(3, 1, 2, 2), np.array([1, 2, 3]), "toy", 10, 0.5, 0.25)
    assert data.head(2).labels.tolist() == [1, 2] and data.head(2).image_shape == (1, 2, 2)
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        data.head(0)
