"""Random shifts and small rotations of a batch of images, vectorized over the batch.

Each sample's transform is drawn from a counter-based hash of ``(seed, epoch, sample_id)``,
not from a stateful generator, so a sample is transformed identically whichever rank,
batch or position it lands in. Every step is elementwise or a gather, so the result for
one sample does not depend on the other samples in the batch either: splitting a batch
among ranks reproduces the single-rank result bit for bit.
"""
from __future__ import annotations

import numpy as np

MAX_SHIFT_PX = 2.0
MAX_DEGREES = 10.0
_U64 = np.uint64


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective mix of uint64 arrays (wrap-around arithmetic)."""
    z = z + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def sample_uniforms(seed: int, epoch: int, sample_ids: np.ndarray, count: int) -> np.ndarray:
    """``(B, count)`` float64 in [0, 1): ``count`` draws per sample, a pure function of
    ``(seed, epoch, sample_id)`` (seed and epoch non-negative)."""
    ids = np.asarray(sample_ids, dtype=np.int64).astype(_U64)
    key = _splitmix64(np.full(ids.shape, seed, dtype=_U64))
    key = _splitmix64(key ^ _U64(epoch))
    key = _splitmix64(key ^ ids)
    counters = np.arange(1, count + 1, dtype=_U64)
    bits = _splitmix64(key[:, None] + counters[None, :])
    return (bits >> _U64(11)).astype(np.float64) * 2.0**-53


def random_shift_rotate(
    x: np.ndarray,
    seed: int,
    epoch: int,
    sample_ids: np.ndarray,
    max_shift: float = MAX_SHIFT_PX,
    max_degrees: float = MAX_DEGREES,
) -> np.ndarray:
    """``x`` ``(B, C, H, W)`` with each image rotated about its centre by up to ``max_degrees``
    and shifted by up to ``max_shift`` pixels per axis (uniform draws keyed by
    ``(seed, epoch, sample_id)``); see :func:`shift_rotate`."""
    u = sample_uniforms(seed, epoch, sample_ids, 3).astype(np.float32)
    degrees = (2 * u[:, 0] - 1) * np.float32(max_degrees)
    shift_y = (2 * u[:, 1] - 1) * np.float32(max_shift)
    shift_x = (2 * u[:, 2] - 1) * np.float32(max_shift)
    return shift_rotate(x, degrees, shift_y, shift_x)


def shift_rotate(x: np.ndarray, degrees: np.ndarray, shift_y: np.ndarray, shift_x: np.ndarray) -> np.ndarray:
    """``x`` ``(B, C, H, W)`` with image ``i`` rotated clockwise (as displayed, rows going down)
    by ``degrees[i]`` about its centre, then shifted by ``(shift_y[i], shift_x[i])`` pixels
    (down and right positive), bilinearly resampled.

    Pixels that come from outside the image are 0, so apply this before normalization
    (0 is the background of the raw pixels). Same dtype as ``x``.
    """
    batch, channels, height, width = x.shape
    angle = np.deg2rad(np.asarray(degrees, dtype=np.float32))[:, None, None]
    cy, cx = np.float32((height - 1) / 2), np.float32((width - 1) / 2)
    # inverse map: the source point of each output pixel is R(-angle) (out - centre - shift) + centre
    dy = np.arange(height, dtype=np.float32)[None, :, None] - cy - np.asarray(shift_y, np.float32)[:, None, None]
    dx = np.arange(width, dtype=np.float32)[None, None, :] - cx - np.asarray(shift_x, np.float32)[:, None, None]
    cos, sin = np.cos(angle), np.sin(angle)
    src_y = cos * dy - sin * dx + cy
    src_x = sin * dy + cos * dx + cx
    # Sample from a copy with a zero border (1 px before, 2 after). A source point further
    # out is clamped onto that border, where its taps either are zero or carry zero weight.
    np.clip(src_y, -1, height, out=src_y)
    np.clip(src_x, -1, width, out=src_x)
    y0, x0 = np.floor(src_y), np.floor(src_x)
    fy, fx = (src_y - y0).astype(x.dtype), (src_x - x0).astype(x.dtype)
    row = width + 3
    index = ((y0.astype(np.int64) + 1) * row + (x0.astype(np.int64) + 1)).reshape(batch, 1, height * width)
    padded = np.zeros((batch, channels, height + 3, row), dtype=x.dtype)
    padded[:, :, 1:height + 1, 1:width + 1] = x
    flat = padded.reshape(batch, channels, (height + 3) * row)

    def tap(offset: int) -> np.ndarray:
        return np.take_along_axis(flat, index + offset, axis=2).reshape(x.shape)

    fy, fx = fy[:, None], fx[:, None]
    top = tap(0) * (1 - fx) + tap(1) * fx
    bottom = tap(row) * (1 - fx) + tap(row + 1) * fx
    return top * (1 - fy) + bottom * fy
