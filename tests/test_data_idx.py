"""IDX parsing and the MNIST / Fashion-MNIST loaders on generated local files."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
from data_files import SPLIT_FILES, idx_bytes, mnist_arrays, mnist_gz_files, write_files

from dtrain.data import DataError, DatasetUnavailable, load_dataset
from dtrain.data.idx import parse_idx, read_idx


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_parse_idx_round_trips_every_type(dtype, compress, rng):
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    blob = idx_bytes(array)
    out = parse_idx(gzip.compress(blob) if compress else blob, "f.idx")
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_parse_idx_reads_multi_member_gzip(rng):
    blob = idx_bytes(rng.integers(0, 256, (7, 6), dtype=np.uint8))
    two_members = gzip.compress(blob[:20]) + gzip.compress(blob[20:])
    np.testing.assert_array_equal(parse_idx(two_members, "f"), parse_idx(blob, "f"))


def test_parse_idx_accepts_empty_dimension():
    assert parse_idx(idx_bytes(np.zeros((0, 28, 28), np.uint8)), "f").shape == (0, 28, 28)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"", "too short"),
        (b"\x00\x00\x08", "too short"),
        (b"\x01\x00\x08\x01" + GOOD[4:], "not an IDX file"),
        (b"\x00\x00\x07\x03" + GOOD[4:], "not an IDX file"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (GOOD[:10], "truncated IDX header"),
        (GOOD[:-1], "truncated IDX data"),
        (GOOD + b"\x00", "extra bytes"),
        (gzip.compress(GOOD)[:-12], "truncated"),
        (gzip.compress(GOOD)[:-8] + b"\xff\xff\xff\xff" + gzip.compress(GOOD)[-4:], "corrupt gzip"),
        (gzip.compress(GOOD) + b"garbage", "corrupt gzip"),
        (b"\x00\x00\x08\x03" + b"\xff\xff\xff\xff" * 3 + b"\x00" * 16, "truncated IDX data"),
    ],
    ids=["empty", "short", "magic", "type", "ndim0", "header", "data", "trailing", "gz-cut", "gz-crc",
         "gz-trailing", "huge-dims"],
)
def test_parse_idx_errors_name_the_file(blob, message):
    with pytest.raises(DataError, match=message) as info:
        parse_idx(blob, "some/dir/bad-file.idx")
    assert "some/dir/bad-file.idx" in str(info.value)


def test_read_idx_errors_for_unreadable_path(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path)


def _mnist_tree(directory, compress=True, sizes=None):
    files = mnist_gz_files(sizes)
    write_files(directory, {
        (name if compress else name[:-3]): (data if compress else gzip.decompress(data))
        for name, (data, _) in files.items()
    })
    return {name: array for name, (_, array) in files.items()}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("subdir", ["mnist", ""])
def test_mnist_loads_local_files(tmp_path, compress, subdir):
    arrays = _mnist_tree(tmp_path / subdir, compress)
    for split, (images_name, labels_name) in SPLIT_FILES.items():
        data = load_dataset("mnist", split, str(tmp_path), download=False)
        assert data.images.shape == (len(arrays[f"{labels_name}.gz"]), 1, 28, 28)
        assert data.images.dtype == np.uint8 and data.labels.dtype == np.int64
        np.testing.assert_array_equal(data.images[:, 0], arrays[f"{images_name}.gz"])
        np.testing.assert_array_equal(data.labels, arrays[f"{labels_name}.gz"])
        assert (data.name, data.num_classes, data.mean, data.std) == ("mnist", 10, 0.1307, 0.3081)


def test_fashion_mnist_reads_its_own_folder(tmp_path):
    _mnist_tree(tmp_path / "mnist", sizes={"train": 3, "test": 2})
    arrays = _mnist_tree(tmp_path / "fashion_mnist", sizes={"train": 5, "test": 2})
    data = load_dataset("fashion_mnist", "train", str(tmp_path), download=False)
    np.testing.assert_array_equal(data.labels, arrays["train-labels-idx1-ubyte.gz"])
    assert (data.name, data.mean, data.std) == ("fashion_mnist", 0.2860, 0.3530)


def test_size_takes_the_first_samples(tmp_path):
    arrays = _mnist_tree(tmp_path)
    data = load_dataset("mnist", "train", str(tmp_path), download=False, size=4)
    np.testing.assert_array_equal(data.labels, arrays["train-labels-idx1-ubyte.gz"][:4])
    with pytest.raises(ValueError, match="size=11 asks for more samples"):
        load_dataset("mnist", "train", str(tmp_path), download=False, size=11)


def test_missing_files_without_download_are_unavailable(tmp_path):
    with pytest.raises(DatasetUnavailable, match="train-images-idx3-ubyte") as info:
        load_dataset("mnist", "train", str(tmp_path), download=False)
    assert "downloading is off" in str(info.value) and str(tmp_path) in str(info.value)


def _write_pair(directory, images, labels):
    write_files(directory, {"train-images-idx3-ubyte": idx_bytes(images), "train-labels-idx1-ubyte": idx_bytes(labels)})


def test_count_mismatch_names_both_files(tmp_path):
    images, labels = mnist_arrays(6, 0)
    _write_pair(tmp_path, images, labels[:5])
    with pytest.raises(DataError, match="6 images but .*5 labels") as info:
        load_dataset("mnist", "train", str(tmp_path), download=False)
    assert "train-images-idx3-ubyte" in str(info.value) and "train-labels-idx1-ubyte" in str(info.value)


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((2, 27, 28), np.uint8), np.zeros(2, np.uint8), r"images of shape \(N, 28, 28\)"),
        (np.zeros((2, 784), np.uint8), np.zeros(2, np.uint8), r"images of shape \(N, 28, 28\)"),
        (np.zeros((2, 28, 28), np.float32), np.zeros(2, np.uint8), "found float32"),
        (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8), "holds no images"),
        (np.zeros((2, 28, 28), np.uint8), np.zeros((2, 1), np.uint8), r"labels of shape \(N,\)"),
        (np.zeros((2, 28, 28), np.uint8), np.array([3, 10], np.uint8), "label 10 at position 1"),
    ],
    ids=["rows", "flat", "float", "empty", "label-dims", "label-range"],
)
def test_malformed_mnist_files_are_named(tmp_path, images, labels, message):
    _write_pair(tmp_path, images, labels)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("mnist", "train", str(tmp_path), download=False)
    assert "train-" in str(info.value)


def test_swapped_files_are_rejected(tmp_path):
    images, labels = mnist_arrays(3, 0)
    _write_pair(tmp_path, labels, images)
    with pytest.raises(DataError, match="train-images-idx3-ubyte: expected unsigned-byte images"):
        load_dataset("mnist", "train", str(tmp_path), download=False)


def test_truncated_gzip_file_is_named(tmp_path):
    images, labels = mnist_arrays(3, 0)
    write_files(tmp_path, {
        "train-images-idx3-ubyte.gz": gzip.compress(idx_bytes(images))[:-30],
        "train-labels-idx1-ubyte": idx_bytes(labels),
    })
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: gzip data is truncated"):
        load_dataset("mnist", "train", str(tmp_path), download=False)
