"""Gradient buckets and the all-reduce strategies: the plan, the bookkeeping in a world of
one, and the (overlapped) reduction under mpirun (equal to the mean of the ranks' gradients)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from mpirun_helper import SCRIPTS, assert_ok, run_mpi

from dtrain.comm.single import SingleCommunicator
from dtrain.nn.flat import FlatParameters
from dtrain.parallel.buckets import plan_buckets
from dtrain.parallel.gradients import AllReduceGradients, OverlappedAllReduceGradients
from dtrain.parallel.workers import ComputeWorker
from dtrain.precision import FullPrecision

sys.path.insert(0, str(SCRIPTS))
from toy import SHAPES, set_step, toy_model


def _flat(align: int = 1):
    model = toy_model(0)
    return model, FlatParameters(model, align=align)


def strategy(cls, model, flat, bucket_bytes: int = 40_000):
    """``cls`` over ``model`` in a world of one, its hook registered as the trainer does."""
    averaging = cls(ComputeWorker(model, flat, FullPrecision(model, flat)), flat, SingleCommunicator(), bucket_bytes)
    if cls is OverlappedAllReduceGradients:
        model.register_backward_hook(averaging.layer_done)
    return averaging


@pytest.mark.parametrize("bucket_bytes", [1, 5_000, 40_000, 10**9])
@pytest.mark.parametrize("align", [1, 64])
def test_plan_tiles_buffer_from_the_end_with_whole_parameters(bucket_bytes, align):
    model, flat = _flat(align)
    buckets = plan_buckets(flat, bucket_bytes)
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


def test_entries_carry_the_layer_that_owns_them():
    model, flat = _flat()
    assert [e.layer for e in flat.entries] == [int(e.name.split(".")[0]) for e in flat.entries]
    assert {e.layer for e in flat.entries} == {i for i, s in enumerate(SHAPES) if s is not None}


@pytest.mark.parametrize("cls", [AllReduceGradients, OverlappedAllReduceGradients])
def test_world_of_one_keeps_gradients_and_records_timing(cls):
    model, flat = _flat()
    averaging = strategy(cls, model, flat)
    assert len(averaging.buckets) > 1
    for step in range(2):
        set_step(model, step)
        model.backward(np.zeros(1, dtype=np.float32))
        local = flat.grads.copy()
        timings = averaging.reduce()
        np.testing.assert_array_equal(flat.grads, local)
        assert sorted(t.bucket for t in timings) == list(range(len(averaging.buckets)))
        assert all(t.seconds >= 0 for t in timings)


def test_backward_twice_without_reduce_is_an_error():
    model, flat = _flat()
    strategy(OverlappedAllReduceGradients, model, flat)
    model.backward(np.zeros(1, dtype=np.float32))
    with pytest.raises(RuntimeError, match="finished backward twice"):
        model.backward(np.zeros(1, dtype=np.float32))


def test_blocking_strategy_reduces_only_when_asked():
    model, flat = _flat()
    averaging = strategy(AllReduceGradients, model, flat)
    model.backward(np.zeros(1, dtype=np.float32))
    model.backward(np.zeros(1, dtype=np.float32))  # no hook: nothing starts during backward
    assert len(averaging.reduce()) == len(averaging.buckets)


def test_overlap_needs_the_master_gradients():
    model, flat = _flat()
    other, other_flat = _flat()
    worker = ComputeWorker(other, other_flat, FullPrecision(other, other_flat))
    with pytest.raises(ValueError, match="float16 compute twin"):
        OverlappedAllReduceGradients(worker, flat, SingleCommunicator(), 40_000)


def test_bad_bucket_size_is_named():
    model, flat = _flat()
    with pytest.raises(ValueError, match="bucket_bytes must be an int >= 1"):
        strategy(AllReduceGradients, model, flat, bucket_bytes=0)


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3])
def test_overlapped_buckets_equal_the_mean_gradient(n):
    assert_ok(run_mpi("reducer.py", n), n)
