"""Cache-sized blocks over threads (dtrain.nn.blocks), the batch-last layout (dtrain.nn.layout) and the
shared scratch and ones vectors (dtrain.nn.workspace)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from layer_checks import assert_matches_torch
from threadpoolctl import threadpool_limits

from dtrain.nn import AvgPool2d, Conv2d, Linear, MaxPool2d, ReLU, blocks, cpu_kernels
from dtrain.nn.blocks import elementwise, for_blocks, split_evenly
from dtrain.nn.layout import as_nchw, batch_last
from dtrain.nn.workspace import Workspace, shared_ones, shared_scratch


@pytest.fixture(autouse=True)
def threads_for_any_work(monkeypatch):
    """These tests' arrays are tiny: let every block count as worth a thread."""
    monkeypatch.setattr(blocks, "THREAD_MIN_BYTES", 1)


@pytest.mark.parametrize("total,parts", [(0, 1), (1, 3), (7, 2), (10, 5), (13, 4)])
def test_split_evenly_covers_the_range_in_order(total, parts):
    ranges = split_evenly(total, parts)
    assert len(ranges) == parts
    assert [i for start, stop in ranges for i in range(start, stop)] == list(range(total))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("total,bytes_per_item", [(1, 10), (5, 1 << 30), (97, 1000), (1000, 8)])
@pytest.mark.parametrize("threads", [1, 2])
def test_for_blocks_calls_every_item_exactly_once(total, bytes_per_item, threads, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4096)
    seen = np.zeros(total, dtype=int)
    calls = []
    lock = threading.Lock()

    def fn(start, stop):
        with lock:
            calls.append((start, stop))
        seen[start:stop] += 1

    with threadpool_limits(limits=threads, user_api="blas"):
        for_blocks(fn, total, bytes_per_item, np.zeros(1))
    assert (seen == 1).all()
    per_block = max(1, 4096 // bytes_per_item)
    assert all(0 < stop - start <= per_block for start, stop in calls)


@pytest.mark.parametrize("threads", [1, 2])
def test_merged_blocks_are_one_call_per_thread(threads, monkeypatch):
    """``merge``: each thread's run of blocks is one call, the runs covering the range once."""
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 8)
    calls = []
    lock = threading.Lock()

    def fn(start, stop):
        with lock:
            calls.append((start, stop))

    with threadpool_limits(limits=threads, user_api="blas"):
        for_blocks(fn, 11, 8, np.zeros(1), merge=True)
    assert sorted(calls) == ([(0, 11)] if threads == 1 else [(0, 5), (5, 11)])


def test_for_blocks_uses_the_thread_budget(monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 8)
    names = set()
    barrier = threading.Barrier(2, timeout=10)  # both runs must be in flight at once

    def fn(start, stop):
        names.add(threading.current_thread().name)
        if start in (0, 4):
            barrier.wait()

    with threadpool_limits(limits=2, user_api="blas"):
        for_blocks(fn, 8, 8, np.zeros(1))
    assert len(names) == 2


@pytest.mark.parametrize("work,threads", [(2 * 4096 - 8, 1), (2 * 4096, 2), (64 * 4096, 2)])
def test_another_thread_only_for_enough_work(monkeypatch, work, threads):
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 8)
    monkeypatch.setattr(blocks, "THREAD_MIN_BYTES", 4096)
    names = set()

    def fn(start, stop):
        names.add(threading.current_thread().name)
        if threads == 2 and start == 0:  # hold the calling thread until the other has run its part
            done.wait(timeout=10)
        elif threads == 2:
            done.set()

    done = threading.Event()
    with threadpool_limits(limits=2, user_api="blas"):
        for_blocks(fn, work // 8, 8, np.zeros(1))
    assert len(names) == threads and threading.current_thread().name in names


def test_for_blocks_reraises_a_block_error_after_all_blocks_finish(monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 8)
    done = []

    def fn(start, stop):
        if start == 5:
            raise ValueError("block 5 failed")
        done.append(start)

    with threadpool_limits(limits=2, user_api="blas"), pytest.raises(ValueError, match="block 5 failed"):
        for_blocks(fn, 10, 8, np.zeros(1))
    assert 9 in done or 0 in done


def test_batch_last_is_a_view_when_the_memory_already_is_batch_last(rng):
    x = rng.normal(size=(3, 4, 5, 2))  # (C, H, W, N)
    nchw = as_nchw(x)
    assert nchw.shape == (2, 3, 4, 5)
    assert np.shares_memory(batch_last(nchw, Workspace(), "b"), x)
    plain = np.ascontiguousarray(nchw)
    copied = batch_last(plain, Workspace(), "b")
    assert not np.shares_memory(copied, plain)
    np.testing.assert_array_equal(copied, x)


# Tiny blocks and two threads: every layer's loops run over many channel blocks in both threads.
@pytest.mark.parametrize(
    "make",
    [
        lambda: (Conv2d(6, 5, 3, stride=2, padding=1, dtype=np.float64), torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)),
        lambda: (Conv2d(6, 4, (2, 3), padding=(0, 2), dtype=np.float64), torch.nn.Conv2d(6, 4, (2, 3), padding=(0, 2))),
        lambda: (MaxPool2d(3, 2, padding=1), torch.nn.MaxPool2d(3, 2, padding=1)),
        lambda: (AvgPool2d(2, padding=1), torch.nn.AvgPool2d(2, padding=1)),
        lambda: (ReLU(), torch.nn.ReLU()),
    ],
    ids=["conv-s2-p1", "conv-rect", "maxpool-p1", "avgpool-p1", "relu"],
)
@pytest.mark.parametrize("layout", ["nchw", "batch_last"])
def test_layers_in_small_blocks_on_two_threads_match_torch(make, layout, rng, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 64)
    monkeypatch.setattr(blocks, "ELEMENTWISE_BLOCK_BYTES", 64)
    layer, torch_layer = make()
    x = rng.normal(size=(3, 6, 7, 8))
    if layout == "batch_last":  # as the previous Conv2d or pooling layer hands it on
        x = as_nchw(np.ascontiguousarray(x.transpose(1, 2, 3, 0)))
    with threadpool_limits(limits=2, user_api="blas"):
        assert_matches_torch(layer, torch_layer, x, np, rng)


def test_a_conv_stack_passes_batch_last_memory_along(rng):
    conv1, relu, pool, conv2 = Conv2d(2, 4, 3, padding=1), ReLU(), MaxPool2d(2), Conv2d(4, 3, 3)
    x = rng.normal(size=(5, 2, 8, 8)).astype(np.float32)
    a = conv1.forward(x)
    assert a.transpose(1, 2, 3, 0).flags.c_contiguous  # no copy back to NCHW
    b = pool.forward(relu.forward(a))
    assert b.transpose(1, 2, 3, 0).flags.c_contiguous
    y = conv2.forward(b)
    assert y.shape == (5, 3, 2, 2)


def layouts(rng) -> dict[str, np.ndarray]:
    base = rng.normal(size=(3, 6, 7, 8))
    return {"nchw": base, "batch_last": as_nchw(np.ascontiguousarray(base.transpose(1, 2, 3, 0))),
            "strided": base[:, ::2]}


@pytest.mark.parametrize("layout", ["nchw", "batch_last", "strided"])
def test_elementwise_work_in_pieces_gives_the_whole_arrays_result(layout, rng, monkeypatch):
    monkeypatch.setattr(blocks, "ELEMENTWISE_BLOCK_BYTES", 64)
    x = layouts(rng)[layout]
    y, calls = np.empty_like(x), []

    def double(a, b):
        calls.append(a.ndim)
        np.multiply(a, 2, out=b)

    with threadpool_limits(limits=2, user_api="blas"):
        elementwise(double, x, y)
    np.testing.assert_array_equal(y, 2 * x)
    # Pieces (1-D, many) where the memory is one run; one call on the whole strided view.
    assert calls == [4] if layout == "strided" else (len(calls) > 10 and set(calls) == {1})


def test_elementwise_takes_small_arrays_as_one_piece_on_this_thread(rng):
    x, calls = layouts(rng)["batch_last"], []  # 8 KiB: far below two blocks
    elementwise(lambda a: calls.append((a.shape, np.shares_memory(a, x), threading.get_ident())), x)
    assert calls == [((x.size,), True, threading.get_ident())]


def test_elementwise_takes_arrays_of_different_layouts_whole(rng, monkeypatch):
    monkeypatch.setattr(blocks, "ELEMENTWISE_BLOCK_BYTES", 64)
    x = layouts(rng)["batch_last"]
    y, calls = np.empty(x.shape), []  # C order: element i of x's memory is not element i of y's

    def copy(a, b):
        calls.append(a.shape)
        b[...] = a

    elementwise(copy, x, y)
    np.testing.assert_array_equal(y, x)
    assert calls == [x.shape]


def test_relu_backward_masks_a_batch_last_gradient_in_place_in_pieces(rng, monkeypatch):
    monkeypatch.setattr(blocks, "ELEMENTWISE_BLOCK_BYTES", 64)
    x, grad = layouts(rng)["batch_last"], layouts(rng)["batch_last"]
    expected = grad * (x > 0)
    relu = ReLU()
    with threadpool_limits(limits=2, user_api="blas"):
        np.testing.assert_array_equal(relu.forward(x), np.maximum(x, 0))
        assert relu.backward(grad) is grad
    np.testing.assert_array_equal(grad, expected)


def test_bias_gradients_sum_with_shared_ones_that_grow_and_stay_ones(rng):
    """Conv2d and Linear sum their bias gradients as products with this thread's shared ones
    vector; batches that grow it, shrink below it and grow it again (and an unrelated
    scratch buffer written in between) must all give the plain sums."""
    conv = Conv2d(8, 12, 2, stride=2, rng=rng, dtype=np.float64)
    assert not cpu_kernels.direct_conv_pays(12, 8 * 2 * 2)  # im2col + GEMM: its bias sum is the GEMV
    linear = Linear(4, 3, rng=rng, dtype=np.float64)
    for n in (2, 9, 3, 17):
        g = rng.normal(size=(n, 12, 2, 2))
        conv.forward(rng.normal(size=(n, 8, 4, 4)))
        conv.backward(g)
        np.testing.assert_allclose(conv.grads["bias"], g.sum(axis=(0, 2, 3)), rtol=1e-12)
        shared_scratch("columns", 64 * n, np.float64, np)[:] = 7.0
        g = rng.normal(size=(n, 3))
        linear.forward(rng.normal(size=(n, 4)))
        linear.backward(g)
        np.testing.assert_allclose(linear.grads["bias"], g.sum(axis=0), rtol=1e-12)
    ones = shared_ones(5, np.float32, np)
    assert ones.dtype == np.float32 and ones.tolist() == [1.0] * 5
