"""Row-partitioned GEMMs: what equality they give, splits, errors, and whole-network training.

A partitioned product is bitwise the product computed block by block (each block one
GEMM with the partition's BLAS budget of one thread), on any CPU. Against the unsplit
product it is equal within the dot-product error bound: both sum the same K products,
each within ``gamma_K * (|a| @ |b|)`` of the exact value (``gamma_K = K u / (1 - K u)``,
``u`` the unit roundoff), so they differ by at most twice that, element by element.
Which rows a BLAS kernel rounds alike depends on the CPU family, so nothing here asserts
bitwise equality with the unsplit product.
"""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from dtrain.backend import get_array_module, to_host
from dtrain.nn import gemm
from dtrain.nn.blocks import split_evenly
from dtrain.parallel.row_partition import (
    RowPartitioner,
    device_count,
    partition_devices,
)

pytestmark = pytest.mark.blas


@pytest.fixture(autouse=True)
def plain_gemm_afterwards():
    """No test leaves a partitioner installed in dtrain.nn.gemm, even when it fails."""
    yield
    gemm.set_partitioner(None)


def row_partition_matmul(a, b, devices, out=None):
    """One product through a partitioner made for it (threads or streams started and stopped)."""
    with RowPartitioner(devices) as partitioner:
        return partitioner(a, b, out)


def partitions(xp, count: int) -> list[int]:
    """``count`` partitions over the devices of ``xp``'s kind, listing devices again when short."""
    available = device_count("cpu" if xp is np else "cuda")
    return [p % available for p in range(count)]


def single_gemm(a, b):
    """The unsplit product with the BLAS budget of one partition (1 thread)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return a @ b


def blockwise_gemm(a, b, parts: int):
    """The product computed block by block, one single-threaded GEMM per block of rows."""
    with threadpool_limits(limits=1, user_api="blas"):
        blocks = [a[start:stop] @ b for start, stop in split_evenly(a.shape[0], parts)]
    return get_array_module(a).concatenate(blocks, axis=0)


def gemm_error_bound(a, b):
    """Twice the dot-product bound ``gamma_K * (|a| @ |b|)``, element by element: how far two
    GEMMs that sum the same products in different orders may lie apart."""
    a64, b64 = (np.abs(to_host(v)).astype(np.float64) for v in (a, b))
    k = a64.shape[1]
    u = np.finfo(to_host(a).dtype).eps / 2
    gamma = k * u / (1 - k * u)
    magnitude = a64 @ b64  # float64 sums of non-negative terms: within gamma_K(float64) of exact
    return 2 * gamma * magnitude * (1 + 2 * k * np.finfo(np.float64).eps)


def operands(xp, rng, m: int, k: int, n: int, dtype=np.float64):
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    return xp.asarray(a), xp.asarray(b)


def assert_partitioned_product(xp, result, a, b, parts: int) -> None:
    """Bitwise the blockwise product (CPU), and within the GEMM error bound of the unsplit one."""
    assert result.shape == (a.shape[0], b.shape[1])
    if xp is np:
        assert result.dtype == np.result_type(a.dtype, b.dtype)
        np.testing.assert_array_equal(result, blockwise_gemm(a, b, parts))
    difference = np.abs(to_host(result).astype(np.float64) - to_host(single_gemm(a, b)).astype(np.float64))
    bound = gemm_error_bound(a, b)
    worst = np.unravel_index(np.argmax(difference - bound), difference.shape) if difference.size else ()
    assert (difference <= bound).all(), f"at {worst}: |difference| {difference[worst]} > bound {bound[worst]}"


def test_the_error_bound_catches_a_wrong_product(rng):
    # The tolerance is tight enough to see one wrong row and a product taken in float32.
    a, b = operands(np, rng, 50, 300, 40)
    wrong = single_gemm(a, b)
    wrong[7] = single_gemm(a[8:9], b)[0]
    with pytest.raises(AssertionError):
        assert_partitioned_product(np, wrong, a, b, 1)
    with pytest.raises(AssertionError):
        assert_partitioned_product(np, (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float64), a, b, 1)


# ------------------------------------------------------------------------------- equality
def test_float64_random_shapes(xp, rng):
    for _ in range(12):
        m, k, n = (int(v) for v in rng.integers(1, 400, size=3))
        a, b = operands(xp, rng, m, k, n)
        for count in (2, 3):
            assert_partitioned_product(xp, row_partition_matmul(a, b, partitions(xp, count)), a, b, count)


def test_float32_random_shapes(xp, rng):
    for m, k, n in [(1420, 358, 226), (936, 608, 127), (2851, 25, 44), (256, 600, 300), (333, 250, 70)]:
        a, b = operands(xp, rng, m, k, n, np.float32)
        for count in (2, 3):
            result = row_partition_matmul(a, b, partitions(xp, count))
            assert result.dtype == np.float32
            assert_partitioned_product(xp, result, a, b, count)


def test_every_small_row_count(xp, rng):
    devices = partitions(xp, 3)
    for m in range(1, len(devices) + 4):  # down to empty and one-row blocks (NumPy's gemv)
        a, b = operands(xp, rng, m, 37, 11)
        assert_partitioned_product(xp, row_partition_matmul(a, b, devices), a, b, len(devices))


def test_row_counts_around_block_boundaries(xp, rng):
    devices = partitions(xp, 2)
    for m in (15, 16, 17, 31, 32, 33, 47, 48, 49, 95, 97, 130):
        a, b = operands(xp, rng, m, 70, 29)
        assert_partitioned_product(xp, row_partition_matmul(a, b, devices), a, b, 2)


def test_blocks_are_even_and_each_is_one_gemm(rng, monkeypatch):
    calls = []
    real_matmul = np.matmul

    def spying_matmul(a, b, out=None):
        calls.append(a.shape[0])
        return real_matmul(a, b, out=out)

    a, b = operands(np, rng, 101, 20, 10)
    with RowPartitioner([0, 0, 0]) as partitioner:
        monkeypatch.setattr(np, "matmul", spying_matmul)
        partitioner(a, b)
        monkeypatch.undo()
    assert sorted(calls) == [33, 34, 34]


def test_multithreaded_blas_is_within_the_bound_too(rng):
    """OpenBLAS's own 2-thread GEMM splits the rows elsewhere: another legitimate rounding."""
    a, b = operands(np, rng, 128, 300, 129)
    with threadpool_limits(limits=2, user_api="blas"):
        two_threads = a @ b
    result = row_partition_matmul(a, b, [0, 0])
    assert_partitioned_product(np, result, a, b, 2)
    assert (np.abs(two_threads - result) <= gemm_error_bound(a, b)).all()


# ----------------------------------------------------------------- layouts, out, devices
def test_transposed_views(xp, rng):
    devices = partitions(xp, 2)
    x = xp.asarray(rng.standard_normal((90, 140)))
    y = xp.asarray(rng.standard_normal((60, 140)))
    z = xp.asarray(rng.standard_normal((90, 45)))
    assert_partitioned_product(xp, row_partition_matmul(x.T, z, devices), x.T, z, 2)  # (140, 90) @ (90, 45)
    assert_partitioned_product(xp, row_partition_matmul(x, y.T, devices), x, y.T, 2)  # (90, 140) @ (140, 60)
    strided = x[::2]  # rows with a gap between them
    assert_partitioned_product(xp, row_partition_matmul(strided, y.T, devices), strided, y.T, 2)


def test_out_is_written_and_returned(xp, rng):
    a, b = operands(xp, rng, 100, 30, 20)
    out = xp.full((100, 20), np.nan)
    result = row_partition_matmul(a, b, partitions(xp, 2), out=out)
    assert result is out
    assert_partitioned_product(xp, out, a, b, 2)


def test_out_not_contiguous_and_out_aliasing_an_input(xp, rng):
    devices = partitions(xp, 2)
    a, b = operands(xp, rng, 64, 64, 64)
    out_t = xp.empty((64, 64)).T  # F-ordered out
    row_partition_matmul(a, b, devices, out=out_t)
    np.testing.assert_array_equal(to_host(out_t), to_host(row_partition_matmul(a, b, devices)))
    b_copy = b.copy()
    row_partition_matmul(a, b_copy, devices, out=b_copy)  # blocks must not read rows already written
    assert_partitioned_product(xp, b_copy, a, b, 2)


def test_device_listed_twice_gets_two_worker_threads(rng):
    a, b = operands(np, rng, 64, 20, 10)
    with RowPartitioner(["cpu:0", "cpu:0"]) as partitioner:
        assert_partitioned_product(np, partitioner(a, b), a, b, 2)
        names = {t.name.rsplit("_", 1)[0] for t in threading.enumerate()}
        assert {"row-partition-0-cpu0", "row-partition-1-cpu0"} <= names


def test_zero_sized_operands(xp, rng):
    devices = partitions(xp, 2)
    a, b = operands(xp, rng, 0, 5, 3)
    assert row_partition_matmul(a, b, devices).shape == (0, 3)
    a, b = operands(xp, rng, 40, 0, 3)
    assert not to_host(row_partition_matmul(a, b, devices)).any()


def numpy_blas_threads() -> set[int]:
    """Thread counts of the BLAS libraries NumPy uses (Numba's first compilation loads
    SciPy's OpenBLAS too: dtrain never calls it, and whether dtrain.threads found it
    depends on which test ran first)."""
    return {lib["num_threads"] for lib in threadpool_info() if lib["filepath"] in NUMPY_BLAS}


# What a process that imports only NumPy has loaded: NumPy's BLAS and nothing else.
NUMPY_BLAS = set(subprocess.run(
    [sys.executable, "-c", "import numpy, threadpoolctl\n"
     "print(*(lib['filepath'] for lib in threadpoolctl.threadpool_info() if lib['user_api'] == 'blas'), sep='\\n')"],
    check=True, capture_output=True, text=True).stdout.splitlines())


def test_each_partition_gets_one_blas_thread_and_the_default_returns(monkeypatch, rng):
    seen = []
    real_matmul = np.matmul

    def spying_matmul(*args, **kwargs):
        seen.append(numpy_blas_threads())
        return real_matmul(*args, **kwargs)

    a, b = operands(np, rng, 64, 20, 10)
    with threadpool_limits(limits=2, user_api="blas"):
        with RowPartitioner([0, 0], blas_threads_per_partition=1) as partitioner:
            monkeypatch.setattr(np, "matmul", spying_matmul)
            partitioner(a, b)
            monkeypatch.undo()
        after = numpy_blas_threads()
    assert seen == [{1}, {1}]
    assert after == {2}


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "a_shape, b_shape, match",
    [
        ((4, 5), (6, 3), r"inner dimensions differ, a is \(4, 5\) and b is \(6, 3\)"),
        ((5,), (5, 3), r"2-D a \(M, K\) and b \(K, N\); got a.shape=\(5,\), b.shape=\(5, 3\)"),
        ((4, 5), (2, 5, 3), r"got a.shape=\(4, 5\), b.shape=\(2, 5, 3\)"),
    ],
)
def test_shape_errors(a_shape, b_shape, match):
    with pytest.raises(ValueError, match=match):
        row_partition_matmul(np.ones(a_shape), np.ones(b_shape), [0, 0])


def test_out_shape_error():
    with pytest.raises(ValueError, match=r"out has shape \(3, 3\).*needs \(4, 2\)"):
        row_partition_matmul(np.ones((4, 5)), np.ones((5, 2)), [0, 0], out=np.empty((3, 3)))


@pytest.mark.parametrize(
    "devices, match",
    [
        ([], "non-empty list of devices"),
        ("cpu:0", "non-empty list of devices"),
        ([0, "tpu:0"], "unknown device 'tpu:0'"),
        (["cpu:x"], "unknown device 'cpu:x'"),
        (["cpu"], "unknown device 'cpu'"),
        ([-1], "unknown device -1"),
        ([True], "unknown device True"),
        ([0, 1.5], "unknown device 1.5"),
        ([0, 10_000], "unknown device cpu:10000: this machine has"),
        (["cpu:10000"], "unknown device cpu:10000: this machine has"),
    ],
)
def test_device_errors(devices, match):
    with pytest.raises(ValueError, match=match):
        row_partition_matmul(np.ones((4, 5)), np.ones((5, 2)), devices)


def test_gpu_devices_cannot_take_numpy_arrays():
    if device_count("cuda") == 0:
        with pytest.raises(ValueError, match="unknown device cuda:0: this machine has 0 visible CUDA devices"):
            RowPartitioner(["cuda:0"])
    else:
        with pytest.raises(ValueError, match="cannot multiply NumPy arrays"):
            RowPartitioner(["cuda:0"])(np.ones((4, 5)), np.ones((5, 2)))


def test_mixed_kinds_and_bad_budget():
    with pytest.raises(ValueError, match="mix CPU and GPU"):
        RowPartitioner(["cpu:0", "gpu:0"])
    with pytest.raises(ValueError, match="blas_threads_per_partition must be an int >= 1, got 0"):
        RowPartitioner([0, 0], blas_threads_per_partition=0)


def test_closed_partitioner_refuses_work():
    partitioner = RowPartitioner([0, 0])
    partitioner.close()
    with pytest.raises(RuntimeError, match="is closed"):
        partitioner(np.ones((4, 5)), np.ones((5, 2)))


# ------------------------------------------------------------------ installing in gemm
def test_the_context_routes_layer_gemms_and_restores_the_previous_routing(rng):
    a, b = operands(np, rng, 64, 20, 10)
    assert gemm._partitioner is None
    with RowPartitioner([0, 0]) as partitioner:
        assert gemm._partitioner is partitioner
        np.testing.assert_array_equal(gemm.matmul(a, b), blockwise_gemm(a, b, 2))
        with RowPartitioner([0, 0, 0]) as inner:
            assert gemm._partitioner is inner
        assert gemm._partitioner is partitioner
        assert inner._closed and not partitioner._closed
    assert gemm._partitioner is None and partitioner._closed
    threads = {t.name for t in threading.enumerate()}
    assert not any(name.startswith("row-partition-") for name in threads), threads  # no threads left over


@pytest.mark.parametrize("listed, per_rank, device, local_rank, local_size, expected", [
    ([3, 1], 1, "gpu", 0, 1, [3, 1]),                     # an explicit list wins
    ([], 1, "cpu", 0, 1, []),                             # one device: plain GEMMs
    ([], 2, "cpu", 1, 2, ["cpu:0", "cpu:1"]),             # CPU: worker threads of this rank
])
def test_partition_devices(listed, per_rank, device, local_rank, local_size, expected):
    assert partition_devices(listed, per_rank, device, local_rank, local_size) == expected


# ------------------------------------------------------------------------ whole network
def tiny_network(xp, dtype):
    conv = pytest.importorskip("dtrain.nn.conv")
    linear = pytest.importorskip("dtrain.nn.linear")
    from dtrain.nn.activation import ReLU
    from dtrain.nn.flatten import Flatten
    from dtrain.nn.module import Sequential

    rng = np.random.default_rng(7)
    # Channel counts and batch are multiples of the 16-row alignment so that the
    # forward, weight-gradient and input-gradient GEMMs all really split.
    model = Sequential(
        conv.Conv2d(2, 32, 3, padding=1, rng=rng, dtype=dtype),
        ReLU(),
        conv.Conv2d(32, 16, 3, stride=2, rng=rng, dtype=dtype),
        ReLU(),
        Flatten(),
        linear.Linear(16 * 3 * 3, 48, rng=rng, dtype=dtype),
        ReLU(),
        linear.Linear(48, 32, rng=rng, dtype=dtype),
    )
    return model.to(xp, dtype)


def train(model, xp, steps: int = 3, lr: float = 0.05):
    """Plain SGD on half the squared error against fixed random targets."""
    rng = np.random.default_rng(11)
    for _ in range(steps):
        x = xp.asarray(rng.standard_normal((32, 2, 8, 8)), dtype=model.dtype)
        target = xp.asarray(rng.standard_normal((32, 32)), dtype=model.dtype)
        y = model(x)
        model.backward((y - target) / y.shape[0])
        for _, layer, name in model.named_parameters():
            layer.params[name] -= lr * layer.grads[name]
    return {full: to_host(layer.params[key]).copy() for full, layer, key in model.named_parameters()}


def test_training_with_row_partitioning_is_blockwise_gemm_training():
    # Bitwise by construction: the reference routes every layer GEMM through the
    # blockwise product, so both runs do the same arithmetic in the same order. (That
    # blockwise products stay within the GEMM error bound of unsplit ones is shown above.)
    def reference(a, b, out):
        product = blockwise_gemm(a, b, 2)
        if out is None:
            return product
        out[...] = product
        return out

    with threadpool_limits(limits=1, user_api="blas"):
        gemm.set_partitioner(reference)
        blockwise = train(tiny_network(np, np.float64), np)
        rows = []
        with RowPartitioner(partitions(np, 2)) as partitioner:
            gemm.set_partitioner(lambda a, b, out: (rows.append(a.shape[0]), partitioner(a, b, out))[1])
            partitioned = train(tiny_network(np, np.float64), np)
    assert sum(m >= 2 for m in rows) >= 6, rows  # most GEMMs were really split
    assert partitioned.keys() == blockwise.keys()
    for name in blockwise:
        np.testing.assert_array_equal(partitioned[name], blockwise[name], err_msg=name)
