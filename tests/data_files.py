"""Small generated dataset files for the data tests (IDX and CSV bytes, MNIST-style trees)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` in IDX layout: magic, big-endian uint32 sizes, big-endian elements."""
    header = bytes([0, 0, TYPE_CODES[array.dtype], array.ndim])
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def mnist_gz_files(sizes: dict[str, int] | None = None) -> dict[str, tuple[bytes, np.ndarray]]:
    """``{file.gz: (compressed bytes, array)}`` for both splits (10 train, 4 test samples)."""
    sizes = sizes or {"train": 10, "test": 4}
    files = {}
    for seed, (split, (images_name, labels_name)) in enumerate(SPLIT_FILES.items()):
        images, labels = mnist_arrays(sizes[split], seed)
        files[f"{images_name}.gz"] = (gzip.compress(idx_bytes(images), mtime=0), images)
        files[f"{labels_name}.gz"] = (gzip.compress(idx_bytes(labels), mtime=0), labels)
    return files


def write_files(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)


def pixel_csv(images: np.ndarray, labels: np.ndarray | None, header: bool, label_first: bool = True) -> str:
    """CSV text with one flattened image per line, the label first or last (or absent)."""
    flat = images.reshape(len(images), -1)
    lines = []
    if header:
        names = [f"pixel{i}" for i in range(flat.shape[1])]
        lines.append(",".join((["label"] if labels is not None else []) + names))
    for i, row in enumerate(flat):
        fields = [str(v) for v in row]
        if labels is not None:
            fields = [str(labels[i])] + fields if label_first else fields + [str(labels[i])]
        lines.append(",".join(fields))
    return "\n".join(lines) + "\n"
