"""DataLoader: sharding, epoch order, rank-count invariance (with augmentation), prefetch thread."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from dtrain.backend import to_host
from dtrain.data import Batch, DataLoader, Dataset, epoch_order, shard_indices
from dtrain.data.augment import random_shift_rotate, sample_uniforms, shift_rotate
from dtrain.data.prefetch import prefetched


def _dataset(n=50, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 1, 8, 6), dtype=np.uint8)
    return Dataset(images, rng.integers(0, 10, n) if labels else None, "toy", 10, 0.25, 0.5)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "dtrain-prefetch"]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shard_indices_cover_every_index_once(world_size):
    for n in range(20):
        shards = [shard_indices(n, r, world_size) for r in range(world_size)]
        np.testing.assert_array_equal(np.concatenate(shards), np.arange(n))
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert all(s.dtype == np.int64 for s in shards)


def test_shard_indices_rejects_bad_rank():
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        shard_indices(10, 2, 2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        shard_indices(10, 0, 0)


def test_epoch_order_depends_only_on_seed_and_epoch():
    np.testing.assert_array_equal(epoch_order(100, 3, 7), epoch_order(100, 3, 7))
    assert not np.array_equal(epoch_order(100, 3, 7), epoch_order(100, 3, 8))
    assert not np.array_equal(epoch_order(100, 3, 7), epoch_order(100, 4, 7))
    np.testing.assert_array_equal(np.sort(epoch_order(100, 3, 7)), np.arange(100))
    np.testing.assert_array_equal(epoch_order(5, 3, 7, shuffle=False), np.arange(5))


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("augment", [False, True])
def test_ranks_concatenated_equal_the_single_rank_batches_bitwise(drop_last, augment):
    data = _dataset(50)
    single = _epoch(DataLoader(data, 12, seed=5, drop_last=drop_last, augment=augment), epoch=2)
    for world_size in (2, 3):
        per_rank = [
            _epoch(DataLoader(data, 12, r, world_size, seed=5, drop_last=drop_last, augment=augment,
                              prefetch=r % 2), epoch=2)
            for r in range(world_size)
        ]
        assert all(len(batches) == len(single) for batches in per_rank)
        for step, whole in enumerate(single):
            parts = [batches[step] for batches in per_rank]
            assert np.array_equal(np.concatenate([p.x for p in parts]), whole.x)
            np.testing.assert_array_equal(np.concatenate([p.y for p in parts]), whole.y)
            np.testing.assert_array_equal(np.concatenate([p.sample_ids for p in parts]), whole.sample_ids)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_an_epoch_visits_each_sample_once(world_size):
    data = _dataset(50)
    for drop_last, expected in ((False, 50), (True, 48)):
        ids = [b.sample_ids for r in range(world_size)
               for b in _epoch(DataLoader(data, 12, r, world_size, drop_last=drop_last), epoch=1)]
        ids = np.concatenate(ids)
        assert len(ids) == expected and len(np.unique(ids)) == expected


def test_final_partial_batch_is_split_as_evenly_as_possible():
    data = _dataset(50)
    loaders = [DataLoader(data, 12, r, 3, drop_last=False) for r in range(3)]
    assert [len(loader) for loader in loaders] == [5, 5, 5]
    last = [list(loader)[-1] for loader in loaders]
    assert [len(b.sample_ids) for b in last] == [1, 1, 0]
    assert last[2].x.shape == (0, 1, 8, 6) and last[2].y.shape == (0,)
    assert [len(b.sample_ids) for b in list(loaders[0])[:-1]] == [4] * 4


def test_order_follows_seed_and_epoch_only():
    data = _dataset(50)
    loader = DataLoader(data, 10, seed=1)
    first, again = _epoch(loader, 0), _epoch(loader, 0)
    other_epoch = _epoch(loader, 1)
    np.testing.assert_array_equal(np.concatenate([b.sample_ids for b in first]), epoch_order(50, 1, 0)[:50])
    np.testing.assert_array_equal(np.concatenate([b.sample_ids for b in again]),
                                  np.concatenate([b.sample_ids for b in first]))
    assert not np.array_equal(first[0].sample_ids, other_epoch[0].sample_ids)
    unshuffled = np.concatenate([b.sample_ids for b in DataLoader(data, 10, shuffle=False)])
    np.testing.assert_array_equal(unshuffled, np.arange(50))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batches_are_normalized_on_the_requested_module(xp, dtype):
    data = _dataset(20)
    batch = next(iter(DataLoader(data, 8, dtype=dtype, xp=xp)))
    assert isinstance(batch, Batch)
    assert batch.x.dtype == dtype and batch.y.dtype == np.int64 and batch.sample_ids.dtype == np.int64
    assert type(batch.x) is type(xp.asarray(np.zeros(1)))
    expected = (data.images[batch.sample_ids].astype(dtype) / 255 - dtype(0.25)) / dtype(0.5)
    np.testing.assert_allclose(to_host(batch.x), expected, rtol=1e-6)
    np.testing.assert_array_equal(to_host(batch.y), data.labels[batch.sample_ids])


def test_host_batches_then_to_device_equal_iteration(xp):
    loader = DataLoader(_dataset(20), 8, dtype=np.float64, xp=xp, augment=True, drop_last=False)
    host = list(loader.host_batches())
    assert all(type(b.x) is np.ndarray and type(b.y) is np.ndarray for b in host)
    for moved, direct in zip([loader.to_device(b) for b in host], loader, strict=True):
        assert type(moved.x) is type(direct.x) and moved.x.dtype == np.float64 and moved.y.dtype == np.int64
        np.testing.assert_array_equal(to_host(moved.x), to_host(direct.x))
        np.testing.assert_array_equal(to_host(moved.y), to_host(direct.y))
        np.testing.assert_array_equal(moved.sample_ids, direct.sample_ids)
    assert loader.to_device(next(DataLoader(_dataset(4, labels=False), 4).host_batches())).y is None


def test_float_images_are_taken_as_scaled():
    data = _dataset(8)
    scaled = Dataset(data.images.astype(np.float32) / 255, data.labels, "toy", 10, 0.25, 0.5)
    a = next(iter(DataLoader(data, 8, shuffle=False)))
    b = next(iter(DataLoader(scaled, 8, shuffle=False)))
    np.testing.assert_allclose(a.x, b.x, rtol=1e-6)


def test_unlabeled_data_gives_y_none():
    batches = list(DataLoader(_dataset(10, labels=False), 4, drop_last=False))
    assert [b.y for b in batches] == [None] * 3


def test_same_sample_gets_the_same_augmentation_wherever_it_lands():
    data = _dataset(30)
    shuffled = {int(i): x for b in DataLoader(data, 6, seed=9, augment=True) for i, x in zip(b.sample_ids, b.x, strict=True)}
    in_order = {int(i): x for b in DataLoader(data, 5, seed=9, augment=True, shuffle=False)
                for i, x in zip(b.sample_ids, b.x, strict=True)}
    plain = {int(i): x for b in DataLoader(data, 5, seed=9, shuffle=False) for i, x in zip(b.sample_ids, b.x, strict=True)}
    assert all(np.array_equal(shuffled[i], in_order[i]) for i in shuffled)
    assert sum(not np.array_equal(in_order[i], plain[i]) for i in in_order) >= 28


def test_augmentation_changes_with_the_epoch():
    loader = DataLoader(_dataset(10), 10, shuffle=False, augment=True)
    assert not np.array_equal(_epoch(loader, 0)[0].x, _epoch(loader, 1)[0].x)


def test_sample_uniforms_are_keyed_and_spread():
    u = sample_uniforms(0, 0, np.arange(20000), 3)
    assert u.shape == (20000, 3) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
    np.testing.assert_array_equal(sample_uniforms(0, 0, np.array([7, 3]), 3), u[[7, 3]])
    assert not np.array_equal(sample_uniforms(1, 0, np.arange(5), 3), u[:5])
    assert not np.array_equal(sample_uniforms(0, 1, np.arange(5), 3), u[:5])


def test_shift_rotate_geometry():
    img = np.arange(1, 26, dtype=np.float64).reshape(1, 1, 5, 5)
    np.testing.assert_allclose(shift_rotate(img, [90.0], [0.0], [0.0])[0, 0], np.rot90(img[0, 0], -1), atol=1e-5)
    shifted = np.zeros((5, 5))
    shifted[1:, :3] = img[0, 0, :4, 2:]
    np.testing.assert_array_equal(shift_rotate(img, [0.0], [1.0], [-2.0])[0, 0], shifted)
    half = shift_rotate(img, [0.0], [0.0], [0.5])[0, 0]
    np.testing.assert_allclose(half[:, 1:], (img[0, 0, :, :-1] + img[0, 0, :, 1:]) / 2)
    np.testing.assert_allclose(half[:, 0], img[0, 0, :, 0] / 2)
    np.testing.assert_array_equal(shift_rotate(img, [0.0], [9.0], [0.0]), np.zeros_like(img))


def _bright_pixel_images(n, y, x):
    img = np.zeros((n, 1, 15, 15), np.float32)
    img[:, 0, y, x] = 1
    return img


def test_random_shifts_stay_within_two_pixels():
    out = random_shift_rotate(_bright_pixel_images(400, 7, 7), 0, 0, np.arange(400), max_degrees=0)
    ys, xs = np.nonzero(out[:, 0].max(axis=0) > 0)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (5, 9, 5, 9)  # +-2 px, bilinear spreads to the next pixel
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), 1, rtol=1e-6)  # a shift inside the frame keeps the mass
    assert out.dtype == np.float32


def test_random_rotations_stay_within_ten_degrees():
    # a pixel 6 px right of the centre moves along an arc of at most 2 * 6 * sin(5 deg) = 1.05 px
    out = random_shift_rotate(_bright_pixel_images(400, 7, 13), 0, 0, np.arange(400), max_shift=0)
    ys, xs = np.nonzero(out[:, 0].max(axis=0) > 0)
    assert ys.min() >= 5 and ys.max() <= 9 and xs.min() >= 12
    assert ys.min() <= 6 and ys.max() >= 8  # and it does rotate both ways
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), 1, rtol=0.05)


def test_augmenting_an_empty_batch_gives_an_empty_batch():
    assert random_shift_rotate(np.zeros((0, 1, 5, 5), np.float32), 0, 0, np.arange(0)).shape == (0, 1, 5, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"global_batch": 10, "world_size": 3}, "global_batch=10 is not divisible by world_size=3"),
        ({"global_batch": 8, "rank": 2, "world_size": 2}, r"rank must be an int in \[0, 2\)"),
        ({"global_batch": 0}, "global_batch must be an int >= 1"),
        ({"global_batch": 64}, "has 50 samples, fewer than one global batch"),
        ({"global_batch": 8, "dtype": np.int32}, "dtype must be a floating type"),
        ({"global_batch": 8, "seed": -1}, "seed must be an int >= 0"),
        ({"global_batch": 8, "prefetch": -1}, "prefetch must be an int >= 0"),
    ],
)
def test_bad_arguments_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataLoader(_dataset(50), **kwargs)
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        DataLoader(_dataset(50), 10).set_epoch(-1)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_keeps_order(depth):
    assert list(prefetched(lambda v: v * v, range(10), depth)) == [v * v for v in range(10)]


def test_worker_exception_reaches_the_consumer_and_the_thread_ends():
    def square_until_five(v):
        if v == 5:
            raise KeyError("boom at 5")
        return v * v

    seen = []
    with pytest.raises(KeyError, match="boom at 5"):
        for value in prefetched(square_until_five, range(10), 2):
            seen.append(value)
    assert seen == [0, 1, 4, 9, 16]
    assert _prefetch_threads() == []


def test_abandoned_iteration_stops_the_thread():
    for _ in DataLoader(_dataset(50), 5, prefetch=2):
        assert _prefetch_threads()
        break
    assert _prefetch_threads() == []
    iterator = iter(DataLoader(_dataset(50), 5, prefetch=2))
    next(iterator)
    iterator.close()
    assert _prefetch_threads() == []


def test_loader_errors_propagate_from_the_thread(monkeypatch):
    loader = DataLoader(_dataset(50), 5, prefetch=2)
    real, calls = loader._prepare_on_host, []

    def fail_on_third_batch(epoch, ids):
        calls.append(ids)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(epoch, ids)

    monkeypatch.setattr(loader, "_prepare_on_host", fail_on_third_batch)
    received = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        for batch in loader:
            received.append(batch)
    assert len(received) == 2
    assert _prefetch_threads() == []


def test_start_batch_resumes_mid_epoch_with_the_remaining_batches():
    loader = DataLoader(_dataset(), global_batch=8, seed=5, prefetch=1)
    full = _epoch(loader, 2)
    loader.set_epoch(2, start_batch=3)
    rest = [(to_host(b.x), b.sample_ids) for b in loader]
    assert len(rest) == len(full) - 3
    for (x, ids), fb in zip(rest, full[3:], strict=True):
        np.testing.assert_array_equal(ids, fb.sample_ids)
        np.testing.assert_array_equal(x, to_host(fb.x))
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=-1)


def test_normalize_matches_the_loader_without_augmentation():
    from dtrain.data.loader import normalize

    ds = _dataset()
    loader = DataLoader(ds, global_batch=10, shuffle=False, prefetch=0)
    first = next(iter(loader))
    np.testing.assert_array_equal(to_host(first.x), normalize(ds, ds.images[:10], np.float32))
