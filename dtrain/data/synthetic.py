"""Random images and labels of any shape, for benchmarks (there is nothing to learn in them)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dtrain.checks import check_int
from dtrain.data.dataset import Dataset

DEFAULT_SIZE = 1024
_SPLIT_STREAMS = {"train": 0, "test": 1}
# uint8 pixels uniform on 0..255, scaled to [0, 1]: mean 1/2, std sqrt((256**2 - 1) / 12) / 255
MEAN = 0.5
STD = float(np.sqrt((256**2 - 1) / 12) / 255)


def load_synthetic(
    split: str,
    size: int | None = None,
    image_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """``size`` uniform uint8 images of ``image_shape`` ``(C, H, W)`` and uniform labels.

    The draws depend only on ``(seed, split)``, and NumPy draws values in order, so a smaller
    set is a prefix of a larger one.
    """
    size = DEFAULT_SIZE if size is None else size
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in shape):
        raise ValueError(f"synthetic: image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    check_int(size, "synthetic: size", 1)
    check_int(num_classes, "synthetic: num_classes", 1)
    stream = _SPLIT_STREAMS[split]
    labels = np.random.default_rng([seed, stream, 0]).integers(0, num_classes, size=size, dtype=np.int64)
    pixels = np.random.default_rng([seed, stream, 1]).integers(0, 256, size=(size, *shape), dtype=np.uint8)
    return Dataset(pixels, labels, "synthetic", int(num_classes), MEAN, STD)
