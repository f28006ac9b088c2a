"""The Kaggle digit-recognizer CSVs: ``train.csv`` (labelled) and ``test.csv`` (unlabelled).

``train.csv`` starts with the header ``label,pixel0,...,pixel783``; ``test.csv`` with
``pixel0,...,pixel783`` and has no labels (prediction mode: ``Dataset.labels`` is None).
The files are looked up in ``<root>/kaggle_digits/`` and then ``<root>/``, raw or ``.gz``;
they cannot be downloaded here (Kaggle needs a login).
"""
from __future__ import annotations

from pathlib import Path

from dtrain.data.dataset import Dataset
from dtrain.data.errors import DataError, DatasetUnavailable
from dtrain.data.pixel_csv import NUM_PIXELS, CsvLayout, parse_pixel_csv

NAME = "kaggle_digits"
PIXEL_COLUMNS = tuple(f"pixel{i}" for i in range(NUM_PIXELS))
LAYOUTS = {
    "train": CsvLayout(label="first", header=("label", *PIXEL_COLUMNS)),
    "test": CsvLayout(label=None, header=PIXEL_COLUMNS),
}
MEAN, STD = 0.1307, 0.3081  # the Kaggle digits are MNIST digits


def load_kaggle_digits(split: str, root: str) -> Dataset:
    """``train.csv`` (images and labels) or ``test.csv`` (images, labels None) from ``root``."""
    filename = f"{split}.csv"
    directories = (Path(root) / NAME, Path(root))
    candidates = [d / name for d in directories for name in (filename, f"{filename}.gz")]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DatasetUnavailable(
            f"{NAME}: {filename} not found (looked for {', '.join(map(str, candidates))}); download it "
            "from the Kaggle 'digit-recognizer' competition and put it in the data root"
        )
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    images, labels = parse_pixel_csv(blob, str(path), LAYOUTS[split])
    return Dataset(images, labels, NAME, 10, MEAN, STD)
