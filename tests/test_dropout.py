"""Dropout and its counter-based RNG: scaling, keep rate, determinism, batch-split invariance."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import layer_gradcheck, rel_err

from dtrain.backend import to_host
from dtrain.nn.dropout import Dropout
from dtrain.nn.rng import hash_bits, mix64, uniform

MASK = (1 << 64) - 1


def reference_mix64(z: int) -> int:
    """SplitMix64's finalizer on Python ints (the published constants), for a known answer."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_mix64_is_splitmix64(xp):
    values = [0, 1, 2, 12345, MASK, 1 << 63, 0x9E3779B97F4A7C15]
    got = to_host(mix64(xp.asarray(np.array(values, dtype=np.uint64)))).tolist()
    assert got == [reference_mix64(v) for v in values]
    # SplitMix64 seeded with 0 outputs 0xE220A8397B1DCDAF first: finalizer of 0 + golden ratio
    assert reference_mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF


def test_uniforms_are_identical_on_every_backend(xp):
    ids = np.array([5, 0, 77, 2**40, -3])
    host = uniform(11, 2, 9, ids, 13)
    device = to_host(uniform(11, 2, 9, xp.asarray(ids), 13))
    np.testing.assert_array_equal(device, host)


def test_uniforms_look_uniform_and_every_key_matters():
    u = uniform(0, 0, 0, np.arange(500), 400).ravel()
    assert u.min() >= 0.0 and u.max() < 1.0
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    expected = u.size / 20
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)  # 5 sigma
    base = hash_bits(1, 2, 3, np.arange(4), 6)
    for changed in (hash_bits(9, 2, 3, np.arange(4), 6), hash_bits(1, 9, 3, np.arange(4), 6),
                    hash_bits(1, 2, 9, np.arange(4), 6), hash_bits(1, 2, 3, np.arange(4) + 4, 6)):
        assert not np.any(changed == base)
    assert len(np.unique(base)) == base.size


def test_eval_is_identity(xp, rng):
    layer = Dropout(0.5).eval()
    x = xp.asarray(rng.normal(size=(4, 6)))
    assert layer.forward(x) is x
    assert layer.backward(x) is x


def test_train_scales_survivors_and_matches_keep_rate(xp):
    p = 0.3
    layer = Dropout(p, seed=3)
    x = xp.ones((256, 1000), dtype=np.float32)
    y = to_host(layer.forward(x))
    assert y.dtype == np.float32
    assert set(np.unique(y).tolist()) == {0.0, np.float32(1 / (1 - p))}
    keep = (y != 0).mean()
    assert abs(keep - (1 - p)) < 5 * np.sqrt(p * (1 - p) / y.size)
    g = to_host(layer.backward(xp.full((256, 1000), 2.0, dtype=np.float32)))
    np.testing.assert_array_equal(g, 2 * y)


def test_matches_torch_formula_with_the_same_mask(xp, rng):
    layer = Dropout(0.4, seed=1)
    x = rng.normal(size=(3, 2, 5))
    y = layer.forward(xp.asarray(x))
    keep = torch.from_numpy(to_host(y) != 0)
    expected = torch.from_numpy(x) * keep / (1 - 0.4)
    assert rel_err(y, expected) < 1e-15


def test_same_context_same_mask_and_no_context_advances(xp):
    x = xp.ones((8, 50))
    a, b = Dropout(0.5, seed=4, salt=1), Dropout(0.5, seed=4, salt=1)
    for layer in (a, b):
        layer.set_batch_context(7, np.arange(100, 108))
    ya = to_host(a.forward(x))
    np.testing.assert_array_equal(ya, to_host(a.forward(x)))  # fixed context: deterministic
    np.testing.assert_array_equal(ya, to_host(b.forward(x)))
    fresh = Dropout(0.5, seed=4, salt=1)
    first, second = to_host(fresh.forward(x)), to_host(fresh.forward(x))
    assert not np.array_equal(first, second)  # step counts forward calls
    replay = Dropout(0.5, seed=4, salt=1)
    replay.set_batch_context(0, None)  # step 0 and ids 0..N-1: what the first call used
    np.testing.assert_array_equal(first, to_host(replay.forward(x)))
    other_salt = Dropout(0.5, seed=4, salt=2)
    other_salt.set_batch_context(7, np.arange(100, 108))
    assert not np.array_equal(ya, to_host(other_salt.forward(x)))


def test_split_batch_gives_the_halves_of_the_full_mask(xp):
    ids = np.array([31, 4, 15, 9, 26, 5, 35, 8, 97])
    x = xp.ones((9, 3, 4))
    full = Dropout(0.5, seed=2, salt=3)
    full.set_batch_context(12, ids)
    whole = to_host(full.forward(x))
    parts = []
    for part in (slice(0, 4), slice(4, 9)):
        rank = Dropout(0.5, seed=2, salt=3)
        rank.set_batch_context(12, xp.asarray(ids[part]))
        parts.append(to_host(rank.forward(x[part])))
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_finite_differences_with_active_dropout(xp, rng):
    layer = Dropout(0.5, seed=5)
    layer.set_batch_context(3, None)
    layer_gradcheck(layer, xp.asarray(rng.normal(size=(4, 5))), rng)


def test_p_zero_is_identity_in_training(xp):
    x = xp.ones((2, 3))
    assert Dropout(0.0).forward(x) is x


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.5", True])
def test_rejects_bad_p(p):
    with pytest.raises(ValueError, match=r"Dropout: p must be a number in \[0, 1\)"):
        Dropout(p)


def test_rejects_bad_seed_and_sample_ids():
    with pytest.raises(ValueError, match="Dropout: seed must be an int"):
        Dropout(0.5, seed=1.5)
    layer = Dropout(0.5)
    layer.set_batch_context(0, np.arange(3))
    with pytest.raises(ValueError, match=r"Dropout.*sample_ids.*one id per sample \(4\).*shape \(3,\)"):
        layer.forward(np.ones((4, 2)))
    layer.set_batch_context(0, np.zeros(4))
    with pytest.raises(ValueError, match=r"integer array.*float64"):
        layer.forward(np.ones((4, 2)))
