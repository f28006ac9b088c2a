"""Gradient buckets: the plan, the reducer's bookkeeping in a world of one, and the
overlapped reduction under mpirun (equal to the mean of the ranks' gradients)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from mpirun_helper import SCRIPTS, assert_ok, run_mpi

from dtrain.dist.buckets import GradientReducer, plan_buckets, resolve_overlap
from dtrain.dist.single import SingleCommunicator
from dtrain.nn.flat import FlatParameters
from dtrain.nn.module import Sequential

sys.path.insert(0, str(SCRIPTS))
from toy import SHAPES, set_step, toy_model  # noqa: E402


def _flat(align: int = 1):
    model = toy_model(0)
    return model, FlatParameters(model, align=align)


@pytest.mark.parametrize("bucket_bytes", [1, 5_000, 40_000, 10**9])
@pytest.mark.parametrize("align", [1, 64])
def test_plan_tiles_buffer_from_the_end_with_whole_parameters(bucket_bytes, align):
    model, flat = _flat(align)
    buckets = plan_buckets(flat, len(model), bucket_bytes)
    assert buckets[0].stop == flat.grads.size and buckets[-1].start == 0
    for later, earlier in zip(buckets, buckets[1:]):
        assert earlier.stop == later.start  # contiguous, from the end towards the start
    offsets = {e.offset for e in flat.entries}
    assert all(b.start in offsets or b.start == 0 for b in buckets)  # whole parameters only
    assert sum(b.nbytes for b in buckets) == flat.grads.nbytes
    assert all(b.nbytes >= bucket_bytes for b in buckets[:-1])
    names = [n for b in buckets for n in b.names]
    assert sorted(names) == sorted(e.name for e in flat.entries)
    assert names[0] == flat.entries[-1].name  # last layer first
    if bucket_bytes == 1:
        assert len(buckets) == len(flat.entries)
    if bucket_bytes == 10**9:
        assert len(buckets) == 1
    layers_with_params = {i for i, s in enumerate(SHAPES) if s is not None}
    assert set().union(*(b.layers for b in buckets)) == layers_with_params


def test_reducer_in_world_of_one_keeps_gradients_and_records_timing():
    model, flat = _flat()
    reducer = GradientReducer(flat, SingleCommunicator(), model, bucket_bytes=40_000)
    assert len(reducer.buckets) > 1
    for step in range(2):
        set_step(model, step)
        model.backward(np.zeros(1, dtype=np.float32))
        local = flat.grads.copy()
        record = reducer.finish()
        np.testing.assert_array_equal(flat.grads, local)
        assert record is reducer.last and record.wait_s >= 0
        assert sorted(t.bucket for t in record.buckets) == list(range(len(reducer.buckets)))
        assert all(t.seconds >= 0 for t in record.buckets)


def test_backward_twice_without_finish_is_an_error():
    model, flat = _flat()
    GradientReducer(flat, SingleCommunicator(), model, bucket_bytes=40_000)
    model.backward(np.zeros(1, dtype=np.float32))
    with pytest.raises(RuntimeError, match="finish"):
        model.backward(np.zeros(1, dtype=np.float32))


def test_no_overlap_and_deterministic_reduce_only_in_finish():
    model, flat = _flat()
    plain = GradientReducer(flat, SingleCommunicator(), model, overlap=False)
    model2, flat2 = _flat()
    exact = GradientReducer(flat2, SingleCommunicator(), model2, overlap=True, deterministic=True)
    assert not plain.overlap and not exact.overlap
    for m in (model, model2):
        m.backward(np.zeros(1, dtype=np.float32))
        m.backward(np.zeros(1, dtype=np.float32))  # no hook work: accumulating passes are fine
    assert len(plain.finish().buckets) == len(plain.buckets)


@pytest.mark.parametrize("setting, backend, expected", [
    ("auto", "nccl", True), ("auto", "mpi", False), ("auto", "single", False),
    (True, "mpi", True), (False, "nccl", False),
])
def test_overlap_auto_is_on_for_nccl_only(setting, backend, expected):
    assert resolve_overlap(setting, backend) is expected


@pytest.mark.parametrize("setting", ["yes", "on", 1, None])
def test_a_bad_overlap_setting_is_named(setting):
    with pytest.raises(ValueError, match="parallel.overlap must be true, false or auto"):
        resolve_overlap(setting, "mpi")


def test_bad_arguments_are_named():
    model, flat = _flat()
    with pytest.raises(ValueError, match="bucket_bytes"):
        GradientReducer(flat, SingleCommunicator(), model, bucket_bytes=0)
    with pytest.raises(TypeError, match="Sequential"):
        GradientReducer(flat, SingleCommunicator(), model.layers[0])
    with pytest.raises(ValueError, match="top-level"):
        GradientReducer(flat, SingleCommunicator(), Sequential(model.layers[0]))


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_overlapped_buckets_equal_the_mean_gradient(n):
    assert_ok(run_mpi("reducer.py", n), n)
