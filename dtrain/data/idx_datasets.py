"""MNIST and Fashion-MNIST from their standard IDX files, downloaded when missing.

Files are looked up, raw or gzipped, in ``<root>/<name>/`` and then in ``<root>/``. A missing
file is downloaded (``.gz``, SHA-256 verified) into ``<cache_dir>/<name>/``, where
``cache_dir`` defaults to ``root`` so the next run finds it there.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtrain.data.dataset import Dataset
from dtrain.data.download import fetch
from dtrain.data.errors import DataError, DatasetUnavailable
from dtrain.data.idx import read_idx

IMAGE_SHAPE = (28, 28)


@dataclass(frozen=True)
class IdxSource:
    """Where an IDX dataset comes from: per split the images and labels file names (without
    ``.gz``), the SHA-256 of each ``.gz`` file, the mirrors (base URLs, tried in order), and
    the normalization constants."""

    name: str
    files: Mapping[str, tuple[str, str]]
    sha256: Mapping[str, str]
    mirrors: Sequence[str]
    mean: float
    std: float
    num_classes: int = 10


_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

MNIST = IdxSource(
    name="mnist",
    files=_SPLIT_FILES,
    sha256={
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/"),
    mean=0.1307,
    std=0.3081,
)

FASHION_MNIST = IdxSource(
    name="fashion_mnist",
    files=_SPLIT_FILES,
    sha256={
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    mean=0.2860,
    std=0.3530,
)


def load_idx_dataset(
    source: IdxSource,
    split: str,
    root: str,
    download: bool = True,
    cache_dir: str | None = None,
    mirrors: Sequence[str] | None = None,
    sha256: Mapping[str, str] | None = None,
) -> Dataset:
    """One split of ``source`` as ``(N, 1, 28, 28)`` uint8 images and int64 labels.

    ``mirrors`` replaces the built-in base URLs, ``sha256`` overrides checksums by ``.gz``
    file name. Raises :class:`DatasetUnavailable` when a file is neither on disk nor
    downloadable, :class:`DataError` when a file is malformed or the pair disagrees.
    """
    images_name, labels_name = source.files[split]
    unknown = sorted(set(sha256 or {}) - set(source.sha256))
    if unknown:
        raise ValueError(f"{source.name}: sha256 overrides for unknown files {unknown}; known: {sorted(source.sha256)}")
    checksums = {**source.sha256, **(sha256 or {})}
    cache = Path(root if cache_dir is None else cache_dir) / source.name
    if isinstance(mirrors, str):
        mirrors = (mirrors,)
    mirror_list = (source.mirrors if mirrors is None else tuple(mirrors)) if download else ()

    def locate(name: str) -> Path:
        local = _find_local(name, Path(root), source.name)
        if local is not None:
            return local
        try:
            return fetch(f"{name}.gz", checksums[f"{name}.gz"], mirror_list, cache)
        except DatasetUnavailable as exc:
            raise DatasetUnavailable(
                f"{source.name} {split} split: {name} (raw or .gz) is in neither "
                f"{Path(root) / source.name}/ nor {Path(root)}/; {exc}"
            ) from None

    images_path, labels_path = locate(images_name), locate(labels_name)
    images = _check_images(read_idx(images_path), images_path)
    labels = _check_labels(read_idx(labels_path), labels_path, source.num_classes)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            "the two files do not belong together"
        )
    return Dataset(images, labels, source.name, source.num_classes, source.mean, source.std)


def _find_local(name: str, root: Path, dataset: str) -> Path | None:
    for directory in (root / dataset, root):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _check_images(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{path}: expected unsigned-byte images of shape (N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}), "
            f"found {array.dtype} data of shape {array.shape}"
        )
    if len(array) == 0:
        raise DataError(f"{path}: holds no images")
    return array.reshape(len(array), 1, *IMAGE_SHAPE)


def _check_labels(array: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 1:
        raise DataError(f"{path}: expected unsigned-byte labels of shape (N,), found {array.dtype} data of shape {array.shape}")
    bad = np.flatnonzero(array >= num_classes)
    if bad.size:
        raise DataError(f"{path}: label {array[bad[0]]} at position {bad[0]} is outside 0..{num_classes - 1}")
    return array.astype(np.int64)
