"""Data-parallel mini-batches: each rank's share of every global batch, normalized, on its device.

Epoch ``e``'s global order is a permutation that depends only on ``(seed, e)``; global batch
``b`` is ``order[b * G:(b + 1) * G]`` and rank ``r`` takes the ``r``-th contiguous slice of
size ``G / world_size``. So every rank runs the same number of steps, and the ranks' slices of
one step, concatenated in rank order, are exactly the batch a single process would see.
With ``drop_last=False`` the final, partial global batch is split as evenly as possible
(:func:`shard_bounds`): some ranks get one sample fewer, and a rank gets an empty batch when
fewer samples than ranks remain, so a trainer must weight gradients by the global count.
A rank may instead be given an explicit ``share``, a sample range of every global batch
(deterministic training hands out whole micro-batches, which need not split evenly).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import closing
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from dtrain.backend import to_device
from dtrain.checks import check_int
from dtrain.data.augment import random_shift_rotate
from dtrain.data.dataset import Dataset
from dtrain.data.prefetch import prefetched
from dtrain.data.sharding import check_rank, shard_bounds


class Batch(NamedTuple):
    """``x`` ``(B, C, H, W)`` normalized floats and ``y`` ``(B,)`` int64 (None for unlabeled
    data), both arrays of the loader's ``xp``; ``sample_ids`` ``(B,)`` int64 NumPy indices into
    the dataset."""

    x: Any
    y: Any
    sample_ids: np.ndarray


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global sample order of an epoch: a permutation of ``range(n)`` that depends only on
    ``(seed, epoch)``, or ``0..n-1`` without shuffling."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


class DataLoader:
    """Iterates over rank ``rank``'s part of each global batch of ``global_batch`` samples.

    ``x`` is ``(pixel / 255 - dataset.mean) / dataset.std`` (``uint8`` images; ``float32``
    images are taken as already scaled to [0, 1]) in ``dtype``, moved to ``xp``. With
    ``augment``, each image is first randomly shifted (<= 2 px) and rotated (<= 10 degrees),
    the draw depending only on ``(seed, epoch, sample_id)``. Host-side preparation of the next
    ``prefetch`` batches runs in a background thread; the transfer to the device happens in
    the consuming thread, on the device and stream that thread is using. Iterating yields
    device batches; a trainer that times the copy on its own iterates :meth:`host_batches`
    and calls :meth:`to_device` itself. ``share=(start, stop)``: take samples ``start ..
    stop - 1`` of every global batch instead of the rank's equal slice (needs ``drop_last``).
    """

    def __init__(
        self,
        dataset: Dataset,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        augment: bool = False,
        xp: ModuleType = np,
        dtype: Any = np.float32,
        prefetch: int = 2,
        share: tuple[int, int] | None = None,
    ) -> None:
        check_rank(rank, world_size)
        for what, value, low in (("global_batch", global_batch, 1), ("seed", seed, 0), ("prefetch", prefetch, 0)):
            check_int(value, f"DataLoader: {what}", low)
        if share is not None:
            start, stop = share
            if not 0 <= start < stop <= global_batch or not drop_last:
                raise ValueError(f"DataLoader: share must be a sample range (start, stop) with 0 <= start < stop <= "
                                 f"global_batch={global_batch}, with drop_last=True; got {share!r}")
        elif global_batch % world_size:
            raise ValueError(
                f"DataLoader: global_batch={global_batch} is not divisible by world_size={world_size}; "
                f"use a multiple of {world_size} so every rank gets the same local batch"
            )
        if np.dtype(dtype).kind != "f":
            raise ValueError(f"DataLoader: dtype must be a floating type, got {np.dtype(dtype)}")
        if drop_last and len(dataset) < global_batch:
            raise ValueError(
                f"DataLoader: dataset {dataset.name!r} has {len(dataset)} samples, fewer than one "
                f"global batch ({global_batch}); lower the batch size or set drop_last=False"
            )
        self.dataset = dataset
        self.global_batch = int(global_batch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        self.augment, self.xp, self.dtype = augment, xp, np.dtype(dtype)
        self.prefetch = int(prefetch)
        self.share = None if share is None else (int(share[0]), int(share[1]))
        self.epoch = 0
        self.start_batch = 0

    @property
    def local_batch(self) -> int:
        """Samples this rank takes from a full global batch."""
        if self.share is not None:
            return self.share[1] - self.share[0]
        return self.global_batch // self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order (and augmentation) the next iteration uses, and the
        batch to start from (a run resumed mid-epoch skips the batches it already trained on)."""
        check_int(epoch, "DataLoader: epoch", 0)
        check_int(start_batch, "DataLoader: start_batch", 0)
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        full, rest = divmod(len(self.dataset), self.global_batch)
        return full + int(rest > 0 and not self.drop_last)

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's sample ids for each batch of ``epoch``."""
        order = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        batches = []
        for b in range(len(self)):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            start, stop = self.share or shard_bounds(len(chunk), self.rank, self.world_size)
            batches.append(chunk[start:stop])
        return batches

    def __iter__(self) -> Iterator[Batch]:
        with closing(self.host_batches()) as batches:
            for batch in batches:
                yield self.to_device(batch)

    def host_batches(self) -> Iterator[Batch]:
        """The batches of the current epoch with ``x`` and ``y`` still NumPy arrays (prepared
        ``prefetch`` ahead in a background thread); :meth:`to_device` moves one."""
        epoch = self.epoch
        prepare = functools.partial(self._prepare_on_host, epoch)
        todo = self.rank_batches(epoch)[self.start_batch:]
        with closing(prefetched(prepare, todo, self.prefetch)) as prepared:
            for x, y, ids in prepared:
                yield Batch(x, y, ids)

    def to_device(self, batch: Batch) -> Batch:
        """``batch`` (from :meth:`host_batches`) with ``x`` in ``dtype`` and ``y`` as int64 on
        the loader's ``xp``: the host-to-device copy, run in the calling thread."""
        y = None if batch.y is None else to_device(batch.y, self.xp, np.int64)
        return Batch(to_device(batch.x, self.xp, self.dtype), y, batch.sample_ids)

    def _prepare_on_host(self, epoch: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Images of ``ids`` as normalized ``dtype`` NumPy arrays (augmented if asked), their labels, ``ids``."""
        data = self.dataset
        x = to_unit_range(data.images[ids], self.dtype)
        if self.augment:
            x = random_shift_rotate(x, self.seed, epoch, ids)
        x -= data.mean
        x /= data.std
        y = None if data.labels is None else data.labels[ids]
        return x, y, ids


def to_unit_range(images: np.ndarray, dtype: Any) -> np.ndarray:
    """A ``dtype`` copy of ``images`` in [0, 1] (``uint8`` pixels are divided by 255)."""
    x = images.astype(dtype)
    if images.dtype == np.uint8:
        x /= 255
    return x


def normalize(dataset: Dataset, images: np.ndarray, dtype: Any) -> np.ndarray:
    """``images`` of ``dataset`` as the network sees them (no augmentation): a ``dtype`` array."""
    x = to_unit_range(images, dtype)
    x -= dataset.mean
    x /= dataset.std
    return x
