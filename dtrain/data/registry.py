"""``load_dataset``: the one entry point that maps a dataset name to its loader."""
from __future__ import annotations

from typing import Any

from dtrain.data.dataset import Dataset
from dtrain.data.idx_datasets import FASHION_MNIST, MNIST, load_idx_dataset
from dtrain.data.kaggle_digits import load_kaggle_digits
from dtrain.data.mnist_sample import load_mnist_sample
from dtrain.data.synthetic import load_synthetic

SPLITS = ("train", "test")
# dataset name -> the extra keyword options its loader takes
DATASET_OPTIONS: dict[str, tuple[str, ...]] = {
    "mnist": ("mirrors", "sha256"),
    "fashion_mnist": ("mirrors", "sha256"),
    "mnist_sample": (),
    "kaggle_digits": (),
    "synthetic": ("image_shape", "num_classes", "seed"),
}
DATASET_NAMES = tuple(DATASET_OPTIONS)


def load_dataset(
    name: str,
    split: str,
    root: str = "data",
    download: bool = True,
    cache_dir: str | None = None,
    size: int | None = None,
    **options: Any,
) -> Dataset:
    """The ``split`` (``train`` or ``test``) of dataset ``name``, optionally its first ``size`` samples.

    ``root`` holds the files (``<root>/<name>/`` or ``<root>/`` itself); ``download`` and
    ``cache_dir`` apply to mnist and fashion_mnist (downloads land in
    ``<cache_dir or root>/<name>/``). Options per dataset: mnist, fashion_mnist take
    ``mirrors`` (base URLs) and ``sha256`` ({file.gz: hex digest}); synthetic takes
    ``image_shape`` (C, H, W), ``num_classes`` and ``seed``, and generates ``size`` samples
    (default 1024). Options that are None mean "default".

    Raises ``ValueError`` for an unknown name, split or option, :class:`DatasetUnavailable` when
    the data can be had neither from disk nor by download (a caller may fall back to another
    dataset), :class:`DataError` for malformed files.
    """
    if name not in DATASET_OPTIONS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"{name}: split must be 'train' or 'test', got {split!r}")
    options = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(options) - set(DATASET_OPTIONS[name]))
    if unknown:
        accepted = ", ".join(DATASET_OPTIONS[name]) or "none"
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; accepted: {accepted}")
    if name == "synthetic":
        return load_synthetic(split, size, **options)
    if name in ("mnist", "fashion_mnist"):
        source = MNIST if name == "mnist" else FASHION_MNIST
        dataset = load_idx_dataset(source, split, root, download, cache_dir, **options)
    elif name == "mnist_sample":
        dataset = load_mnist_sample(split)
    else:
        dataset = load_kaggle_digits(split, root)
    return dataset if size is None else dataset.head(size)
