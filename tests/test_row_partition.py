"""Row-partitioned GEMMs: exactness against one GEMM, splits, errors, and whole-network training.

The CPU reference is one GEMM run with one BLAS thread, the budget each partition gets:
OpenBLAS's multi-threaded GEMM itself splits rows at unaligned places and so differs
from its single-threaded result in the last bits (see test_multithreaded_blas_is_not_the_reference).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from dtrain.backend import to_host
from dtrain.nn import gemm
from dtrain.parallel import (
    RowPartitioner,
    disable_row_partition,
    enable_row_partition,
    row_partition_matmul,
    split_rows,
)
from dtrain.parallel.row_partition import device_count

# Float32 rows of this OpenBLAS are computed in groups of 24 (Haswell sgemm kernel), so
# float32 blocks are bitwise exact only when aligned to a multiple of 24 and of 16.
FLOAT32_EXACT_ALIGN = 48


@pytest.fixture(autouse=True)
def plain_gemm_afterwards():
    """No test leaves a partitioner installed in dtrain.nn.gemm, even when it fails."""
    yield
    disable_row_partition()


def partitions(xp, count: int) -> list[int]:
    """``count`` partitions over the devices of ``xp``'s kind, listing devices again when short."""
    available = device_count("cpu" if xp is np else "cuda")
    return [p % available for p in range(count)]


def single_gemm(a, b):
    """The unsplit product with the BLAS budget of one partition (1 thread)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return a @ b


def operands(xp, rng, m: int, k: int, n: int, dtype=np.float64):
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    return xp.asarray(a), xp.asarray(b)


def assert_matches_single_gemm(xp, result, a, b) -> None:
    expected = single_gemm(a, b)
    if xp is np:
        assert result.dtype == expected.dtype
        np.testing.assert_array_equal(result, expected)
    else:  # cuBLAS picks kernels by shape, so row blocks round differently
        scale = float(xp.abs(a).max() * xp.abs(b).max() * a.shape[1]) or 1.0
        assert float(xp.abs(result - expected).max()) <= 1e-12 * scale


# ------------------------------------------------------------------------------------ splits
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_split_rows_even_for_every_small_row_count(parts):
    for m in range(0, parts + 4):
        sizes = split_rows(m, parts, row_align=1)
        assert sum(sizes) == m and len(sizes) == parts
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # empty blocks come last


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("row_align", [16, 48])
def test_split_rows_aligned_blocks(parts, row_align):
    for m in range(0, (parts + 2) * row_align + 5):
        sizes = split_rows(m, parts, row_align)
        assert sum(sizes) == m
        starts = np.cumsum([0] + sizes[:-1])
        assert all(start % row_align == 0 for start, size in zip(starts, sizes) if size)
        full = [size // row_align for size in sizes]
        assert max(full) - min(full) <= 1
        # A one-row block would take NumPy's gemv path and round differently.
        assert m == 1 or 1 not in sizes


def test_split_rows_rejects_bad_arguments():
    with pytest.raises(ValueError, match="parts >= 1"):
        split_rows(10, 0)
    with pytest.raises(ValueError, match="row_align >= 1"):
        split_rows(10, 2, row_align=0)


# ------------------------------------------------------------------------------- exactness
def test_float64_bitwise_equal_on_random_shapes(xp, rng):
    for _ in range(12):
        m, k, n = (int(v) for v in rng.integers(1, 400, size=3))
        a, b = operands(xp, rng, m, k, n)
        for count in (2, 3):
            assert_matches_single_gemm(xp, row_partition_matmul(a, b, partitions(xp, count)), a, b)


@pytest.mark.parametrize("row_align", [1, 16])
def test_every_small_row_count(xp, rng, row_align):
    devices = partitions(xp, 3)
    for m in range(1, len(devices) + 4):
        a, b = operands(xp, rng, m, 37, 11)
        result = row_partition_matmul(a, b, devices, row_align=row_align)
        assert result.shape == (m, 11)
        if row_align == 1:  # one-row blocks go through gemv: equal to rounding only
            np.testing.assert_allclose(to_host(result), to_host(single_gemm(a, b)), rtol=0, atol=1e-12)
        else:
            assert_matches_single_gemm(xp, result, a, b)


def test_row_counts_around_block_boundaries(xp, rng):
    devices = partitions(xp, 2)
    for m in (15, 16, 17, 31, 32, 33, 47, 48, 49, 95, 97, 130):
        a, b = operands(xp, rng, m, 70, 29)
        assert_matches_single_gemm(xp, row_partition_matmul(a, b, devices), a, b)


def test_float32_within_rounding(xp, rng):
    a, b = operands(xp, rng, 333, 250, 70, np.float32)
    result = row_partition_matmul(a, b, partitions(xp, 2))
    assert result.dtype == np.float32
    exact = to_host(a).astype(np.float64) @ to_host(b).astype(np.float64)
    scale = np.abs(exact).max()
    assert np.abs(to_host(result) - exact).max() <= 1e-5 * scale


def test_float32_bitwise_with_kernel_aligned_blocks(rng):
    # With the default alignment float32 blocks differ from the single GEMM in the last
    # bits (sgemm groups rows by 24); aligned to 48 rows they are identical.
    for m, k, n in [(1420, 358, 226), (936, 608, 127), (2851, 25, 44), (256, 600, 300)]:
        a, b = operands(np, rng, m, k, n, np.float32)
        for count in (2, 3):
            result = row_partition_matmul(a, b, partitions(np, count), row_align=FLOAT32_EXACT_ALIGN)
            np.testing.assert_array_equal(result, single_gemm(a, b))


def test_multithreaded_blas_is_not_the_reference(rng):
    """Documents why the reference uses one BLAS thread: with two, OpenBLAS's own row
    split moves rows onto other kernel variants and the last bits change."""
    a, b = operands(np, rng, 128, 300, 129)
    with threadpool_limits(limits=2, user_api="blas"):
        two_threads = a @ b
    result = row_partition_matmul(a, b, [0, 0])
    np.testing.assert_array_equal(result, single_gemm(a, b))
    np.testing.assert_allclose(result, two_threads, rtol=0, atol=1e-12)


# ----------------------------------------------------------------- layouts, out, devices
def test_transposed_views(xp, rng):
    devices = partitions(xp, 2)
    x = xp.asarray(rng.standard_normal((90, 140)))
    y = xp.asarray(rng.standard_normal((60, 140)))
    z = xp.asarray(rng.standard_normal((90, 45)))
    assert_matches_single_gemm(xp, row_partition_matmul(x.T, z, devices), x.T, z)  # (140, 90) @ (90, 45)
    assert_matches_single_gemm(xp, row_partition_matmul(x, y.T, devices), x, y.T)  # (90, 140) @ (140, 60)
    strided = x[::2]  # rows with a gap between them
    assert_matches_single_gemm(xp, row_partition_matmul(strided, y.T, devices), strided, y.T)


def test_out_is_written_and_returned(xp, rng):
    a, b = operands(xp, rng, 100, 30, 20)
    out = xp.full((100, 20), np.nan)
    result = row_partition_matmul(a, b, partitions(xp, 2), out=out)
    assert result is out
    assert_matches_single_gemm(xp, out, a, b)


def test_out_not_contiguous_and_out_aliasing_an_input(xp, rng):
    devices = partitions(xp, 2)
    a, b = operands(xp, rng, 64, 64, 64)
    expected = single_gemm(a, b)
    out_t = xp.empty((64, 64)).T  # F-ordered out
    row_partition_matmul(a, b, devices, out=out_t)
    np.testing.assert_array_equal(to_host(out_t), to_host(row_partition_matmul(a, b, devices)))
    b_copy = b.copy()
    row_partition_matmul(a, b_copy, devices, out=b_copy)  # blocks must not read rows already written
    np.testing.assert_allclose(to_host(b_copy), to_host(expected), rtol=0, atol=1e-12)


def test_device_listed_twice_gets_two_worker_threads(rng):
    a, b = operands(np, rng, 64, 20, 10)
    with RowPartitioner(["cpu:0", "cpu:0"]) as partitioner:
        assert_matches_single_gemm(np, partitioner(a, b), a, b)
        names = {t.name.rsplit("_", 1)[0] for t in threading.enumerate()}
        assert {"row-partition-0-cpu0", "row-partition-1-cpu0"} <= names


def test_zero_sized_operands(xp, rng):
    devices = partitions(xp, 2)
    a, b = operands(xp, rng, 0, 5, 3)
    assert row_partition_matmul(a, b, devices).shape == (0, 3)
    a, b = operands(xp, rng, 40, 0, 3)
    assert not to_host(row_partition_matmul(a, b, devices)).any()


def test_each_partition_gets_one_blas_thread_and_the_default_returns(monkeypatch, rng):
    seen = []
    real_matmul = np.matmul

    def spying_matmul(*args, **kwargs):
        seen.append({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})
        return real_matmul(*args, **kwargs)

    a, b = operands(np, rng, 64, 20, 10)
    with threadpool_limits(limits=2, user_api="blas"):
        with RowPartitioner([0, 0], blas_threads_per_partition=1) as partitioner:
            monkeypatch.setattr(np, "matmul", spying_matmul)
            partitioner(a, b)
            monkeypatch.undo()
        after = {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
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
    with pytest.raises(ValueError, match="blas_threads_per_partition must be a positive int, got 0"):
        RowPartitioner([0, 0], blas_threads_per_partition=0)


def test_closed_partitioner_refuses_work():
    partitioner = RowPartitioner([0, 0])
    partitioner.close()
    with pytest.raises(RuntimeError, match="is closed"):
        partitioner(np.ones((4, 5)), np.ones((5, 2)))


# ------------------------------------------------------------------ installing in gemm
def test_enable_with_one_device_installs_nothing():
    with enable_row_partition([0]) as partitioner:
        assert partitioner is None and gemm._partitioner is None


def test_enable_routes_layer_gemms_and_restores(rng):
    a, b = operands(np, rng, 64, 20, 10)
    with enable_row_partition([0, 0]) as partitioner:
        assert gemm._partitioner is partitioner
        np.testing.assert_array_equal(gemm.matmul(a, b), single_gemm(a, b))
        with enable_row_partition([0, 0, 0]) as inner:
            assert gemm._partitioner is inner
        assert gemm._partitioner is partitioner
    assert gemm._partitioner is None
    enable_row_partition([0, 0])
    assert gemm._partitioner is not None
    disable_row_partition()
    assert gemm._partitioner is None


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
        model.zero_grad()
        y = model(x)
        model.backward((y - target) / y.shape[0])
        for _, layer, name in model.named_parameters():
            layer.params[name] -= lr * layer.grads[name]
    return {full: to_host(layer.params[key]).copy() for full, layer, key in model.named_parameters()}


def test_training_with_row_partitioning_matches_plain_gemm(xp):
    with threadpool_limits(limits=1, user_api="blas"):
        plain = train(tiny_network(xp, np.float64), xp)
        rows = []
        with enable_row_partition(partitions(xp, 2)) as partitioner:
            gemm.set_partitioner(lambda a, b, out: (rows.append(a.shape[0]), partitioner(a, b, out))[1])
            partitioned = train(tiny_network(xp, np.float64), xp)
    assert sum(split_rows(m, 2)[1] > 0 for m in rows) >= 6, rows  # most GEMMs were really split
    assert plain.keys() == partitioned.keys()
    for name in plain:
        if xp is np:
            np.testing.assert_array_equal(partitioned[name], plain[name], err_msg=name)
        else:
            np.testing.assert_allclose(partitioned[name], plain[name], rtol=1e-10, atol=1e-12, err_msg=name)
