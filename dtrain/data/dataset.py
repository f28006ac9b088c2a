"""The in-memory dataset every loader returns: images, labels and normalization constants."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dtrain.checks import check_int
from dtrain.data.errors import DataError

IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


@dataclass(frozen=True)
class Dataset:
    """One split of a dataset, held on the host.

    ``images`` is ``(N, C, H, W)``: ``uint8`` pixels in 0..255, or ``float32`` already scaled to
    [0, 1]. ``labels`` is ``int64`` of shape ``(N,)`` with values in ``[0, num_classes)``, or
    None for unlabeled data (prediction mode). ``mean`` and ``std`` normalize pixels scaled to
    [0, 1]: ``x = (pixel / 255 - mean) / std``.
    """

    images: np.ndarray
    labels: np.ndarray | None
    name: str
    num_classes: int
    mean: float
    std: float

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.ndim != 4:
            raise DataError(
                f"dataset {self.name!r}: images must be a NumPy array of shape (N, C, H, W), "
                f"got {type(images).__name__} of shape {getattr(images, 'shape', None)}"
            )
        if images.dtype not in IMAGE_DTYPES:
            raise DataError(
                f"dataset {self.name!r}: images must be uint8 or float32, got {images.dtype}"
            )
        if self.num_classes < 1:
            raise DataError(f"dataset {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        if not self.std > 0:
            raise DataError(f"dataset {self.name!r}: std must be positive, got {self.std}")
        if labels is None:
            return
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != images.shape[:1]:
            raise DataError(
                f"dataset {self.name!r}: labels must be int64 of shape ({len(images)},), got "
                f"{getattr(labels, 'dtype', type(labels).__name__)} of shape {getattr(labels, 'shape', None)}"
            )
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            raise DataError(
                f"dataset {self.name!r}: label {labels[bad[0]]} of sample {bad[0]} is outside "
                f"[0, {self.num_classes})"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Per-sample shape ``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    def take(self, indices: np.ndarray) -> Dataset:
        """The samples at ``indices`` (int array), in that order: a new dataset with copies."""
        labels = None if self.labels is None else self.labels[indices]
        return Dataset(self.images[indices], labels, self.name, self.num_classes, self.mean, self.std)

    def head(self, size: int) -> Dataset:
        """The first ``size`` samples (a deterministic subset sharing this dataset's memory)."""
        check_int(size, f"dataset {self.name!r}: size", 1)
        if size > len(self):
            raise ValueError(
                f"dataset {self.name!r}: size={size} asks for more samples than the split holds "
                f"({len(self)}); lower size or leave it unset"
            )
        labels = None if self.labels is None else self.labels[:size]
        return Dataset(self.images[:size], labels, self.name, self.num_classes, self.mean, self.std)
