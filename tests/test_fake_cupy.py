"""The CPU stand-in for CuPy (tests/fake_cupy): its CuPy semantics, and dtrain's GPU paths on it.

Everything that imports the fake runs in subprocesses (:mod:`fake_cupy.run`); this
process never imports it. Each snippet prints ``OK`` at its end.
"""
from __future__ import annotations

import shutil
import sys

import pytest
from fake_cupy.run import FAKE_DIR, python_command, run_fake, run_fake_mpi

# The fake compiles ElementwiseKernels with g++.
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to run the fake's CUDA kernels")


@pytest.fixture(autouse=True)
def shared_kernel_cache(tmp_path_factory, monkeypatch):
    """One compiled-kernel directory for every subprocess of the session (compile once)."""
    monkeypatch.setenv("FAKE_CUPY_KERNEL_CACHE", str(tmp_path_factory.getbasetemp() / "fake_cupy_kernels"))


def assert_ok(result) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "OK" in result.stdout, output


def test_this_process_never_imports_the_fake():
    cupy = sys.modules.get("cupy")
    assert cupy is None or not str(getattr(cupy, "__file__", "")).startswith(str(FAKE_DIR))


# -- arrays -----------------------------------------------------------------------------------

def test_device_arrays_compute_like_numpy_views_and_all():
    assert_ok(run_fake("""
        import ctypes, pickle
        import numpy as np
        import cupy

        host = np.arange(12, dtype=np.float32).reshape(3, 4)
        a = cupy.asarray(host)
        assert type(a) is cupy.ndarray and not isinstance(a, np.ndarray)
        assert cupy.get_array_module(a) is cupy and cupy.get_array_module(host) is np
        assert cupy.asarray(a) is a and cupy.asarray(a, dtype=np.float64).dtype == np.float64
        assert (a.shape, a.dtype, a.size, a.ndim, a.nbytes, a.itemsize, a.strides) == \\
            ((3, 4), np.float32, 12, 2, 48, 4, (16, 4))

        # arithmetic, NumPy and Python scalars, comparisons
        np.testing.assert_array_equal(((a * 2 + 1) / 4 - a ** 2).get(), (host * 2 + 1) / 4 - host ** 2)
        np.testing.assert_array_equal((np.float32(2) * a - np.float64(0.5)).get(), 2 * host - 0.5)
        assert (a > 5).dtype == np.bool_ and int((a > 5).sum()) == 6
        np.testing.assert_array_equal(cupy.where(a > 5, a, 0).get(), np.where(host > 5, host, 0))
        np.testing.assert_array_equal(cupy.maximum(a, 3).get(), np.maximum(host, 3))

        # in place and out=: the given array comes back, written in place
        c = a.copy()
        same = c
        c += 1
        c *= a
        assert c is same
        np.testing.assert_array_equal(c.get(), (host + 1) * host)
        out = cupy.empty_like(a)
        assert cupy.multiply(a, 3, out=out) is out and np.array_equal(out.get(), host * 3)
        m = cupy.empty((3, 3), dtype=np.float32)
        assert cupy.matmul(a, a.T, out=m) is m and np.array_equal(m.get(), host @ host.T)
        bias = cupy.zeros(4, dtype=np.float32)
        assert cupy.sum(a, axis=0, out=bias) is bias and np.array_equal(bias.get(), host.sum(axis=0))

        # reductions give 0-d device arrays, as in CuPy
        total = a.sum()
        assert type(total) is cupy.ndarray and total.shape == () and float(total) == 66.0
        assert type(cupy.count_nonzero(a > 5)) is cupy.ndarray and int(cupy.count_nonzero(a > 5)) == 6
        assert int(cupy.argmax(a)) == 11 and f"{a.mean():.2f}" == "5.50" and bool(a.any())
        assert type(np.sum(a)) is cupy.ndarray and type(np.concatenate([a, a])) is cupy.ndarray

        # indexing: views write through, a[i, j] is a 0-d view, fancy indexing copies
        row = a[1]
        row[2] = 100
        assert float(a[1, 2]) == 100 and a[1, 2].shape == ()
        a[0, 0].fill(-1)
        assert float(a[0, 0]) == -1
        np.testing.assert_array_equal(a[cupy.asarray([0, 2])].get(), a.get()[[0, 2]])
        np.testing.assert_array_equal(a[a > 50].get(), [100])
        a[:, 3] = cupy.full(3, 7, dtype=np.float32)
        a[2] = 0.5
        expected = host.copy()
        expected[1, 2], expected[0, 0], expected[:, 3], expected[2] = 100, -1, 7, 0.5
        np.testing.assert_array_equal(a.get(), expected)
        assert not a[:, ::2].flags.c_contiguous and a.flags.c_contiguous and not hasattr(a.flags, "writeable")
        assert len(a) == 3 and [r.shape for r in a] == [(4,)] * 3

        # .get() is a host copy; .data.ptr points at the first element
        h = a.get()
        h[...] = 0
        assert float(a[1, 2]) == 100
        assert ctypes.c_float.from_address(a.data.ptr).value == -1
        assert a[1, 1:].data.ptr == a.data.ptr + 5 * 4 and a.data.device_id == 0 and a.device.id == 0
        assert cupy.may_share_memory(a, a[1]) and not cupy.may_share_memory(a, a.copy())

        # host/device mixing is an error, as in CuPy
        def refused(fn, kind=TypeError):
            try:
                fn()
            except kind as err:
                return str(err)
            raise AssertionError(f"accepted: {fn}")

        assert "Unsupported type <class 'numpy.ndarray'>" in refused(lambda: a + np.ones((3, 4), np.float32))
        refused(lambda: np.ones((3, 4), np.float32) + a)
        refused(lambda: a * np.array(2.0))  # even 0-d NumPy arrays
        refused(lambda: cupy.multiply(a, np.ones(4)))
        refused(lambda: cupy.concatenate([a, np.ones((1, 4), np.float32)]))
        assert refused(lambda: np.asarray(a)) == ("Implicit conversion to a NumPy array is not allowed. "
                                                  "Please use `.get()` to construct a NumPy array explicitly.")
        refused(lambda: np.array(a, dtype=np.float64))
        refused(lambda: a.__setitem__(Ellipsis, np.ones((3, 4), np.float32)), ValueError)
        refused(lambda: a.ctypes, AttributeError)  # NumPy-only attributes are missing, as in CuPy

        back = pickle.loads(pickle.dumps(a))
        assert type(back) is cupy.ndarray and np.array_equal(back.get(), a.get())
        print("OK")
    """))


# -- kernels and layers --------------------------------------------------------------------------

@needs_gxx
def test_dtrain_layers_on_the_fake_gpu_match_the_cpu_path():
    """Conv2d, MaxPool2d, AvgPool2d (their CUDA kernels), Linear and ReLU, alone and with the
    ReLUs fused into a Sequential's layers, forward and backward in float32 and float64, on
    GPU 0 and on GPU 1, against the NumPy path."""
    assert_ok(run_fake("""
        import warnings
        import numpy as np
        import cupy
        from cupy._util import PerformanceWarning
        from dtrain.nn import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential

        warnings.simplefilter("error", PerformanceWarning)  # nothing may touch another device's array
        cases = [
            (lambda d: Conv2d(3, 4, 3, stride=2, padding=1, rng=np.random.default_rng(1), dtype=d), (2, 3, 9, 8)),
            (lambda d: Conv2d(3, 5, (3, 2), padding=(1, 0), rng=np.random.default_rng(2), dtype=d), (3, 3, 6, 7)),
            (lambda d: MaxPool2d(3, 2, 1), (2, 3, 9, 8)),
            (lambda d: MaxPool2d(2), (3, 2, 6, 6)),
            (lambda d: AvgPool2d(3, 2, 1), (2, 3, 9, 8)),
            (lambda d: AvgPool2d((2, 3), 1), (2, 2, 5, 7)),
            (lambda d: Linear(7, 5, rng=np.random.default_rng(3), dtype=d), (4, 7)),
            (lambda d: ReLU(), (2, 3, 4, 5)),
            # ReLUs fused into the layers around them: forward_relu, backward_through_relu
            (lambda d: Sequential(Conv2d(3, 4, 3, stride=2, padding=1, rng=np.random.default_rng(4), dtype=d), ReLU(),
                                  Conv2d(4, 5, 3, padding=1, rng=np.random.default_rng(5), dtype=d), ReLU(),
                                  MaxPool2d(2), Flatten(), Linear(20, 6, rng=np.random.default_rng(6), dtype=d), ReLU()),
             (2, 3, 9, 8)),
        ]

        def close(got, want, tol, what):
            assert isinstance(got, cupy.ndarray), what
            got = got.get()
            assert got.dtype == want.dtype and got.shape == want.shape, what
            err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
            assert err <= tol, (what, err)

        rng = np.random.default_rng(0)
        for device in (0, 1):
            with cupy.cuda.Device(device):
                for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
                    for build, shape in cases:
                        cpu, gpu = build(dtype), build(dtype).to(cupy)
                        x = rng.standard_normal(shape).astype(dtype)
                        y_cpu = cpu.forward(x)
                        y_gpu = gpu.forward(cupy.asarray(x))
                        what = f"{type(cpu).__name__} {np.dtype(dtype)} on GPU {device}"
                        assert y_gpu.device.id == device, what
                        close(y_gpu, y_cpu, tol, what + " forward")
                        g = rng.standard_normal(y_cpu.shape).astype(dtype)
                        close(gpu.backward(cupy.asarray(g)), cpu.backward(g.copy()), tol, what + " backward")
                        for key in cpu.grads:
                            close(gpu.grads[key], cpu.grads[key], tol, f"{what} grads[{key!r}]")
        print("OK")
    """))


@needs_gxx
def test_elementwise_kernel_types_and_calls_follow_cupy(tmp_path):
    log = tmp_path / "calls.jsonl"
    assert_ok(run_fake("""
        import json, os
        import numpy as np
        import cupy

        def refused(fn, kind):
            try:
                fn()
            except kind as err:
                return err
            raise AssertionError(f"accepted: {fn}")

        x = cupy.arange(6, dtype=np.float32)
        y = cupy.empty(6, dtype=np.float32)

        # A placeholder that only a scalar carries is never resolved: KeyError, as in CuPy
        untyped = cupy.ElementwiseKernel("raw T x, A zero, int64 n", "T y", "y = x[n - 1 - i] + (T)zero;",
                                         "untyped_accumulator")
        for zero in (np.float32(0), 0.0, 0):
            assert refused(lambda: untyped(x, zero, 6, y), KeyError).args == ("A",)

        # ... while a placeholder defined in the preamble from T works (dtrain's fix)
        typed = cupy.ElementwiseKernel(
            "raw T x, int64 n", "T y", "A acc = (A)x[n - 1 - i]; y = (T)(acc * 2);", "typed_accumulator",
            preamble="template <typename X> struct acc { typedef X type; };\\n"
                     "template <> struct acc<float16> { typedef float type; };\\n"
                     "typedef acc<T>::type A;")
        for dtype in (np.float16, np.float32, np.float64):
            v = cupy.arange(6, dtype=dtype)
            assert typed(v, 6, cupy.empty(6, dtype=dtype)).get().tolist() == [10, 8, 6, 4, 2, 0]

        # types: arrays decide placeholders, scalars are cast to their parameter's type
        axpy = cupy.ElementwiseKernel("T a, T x, T y", "T z", "z = a * x + y", "axpy")
        np.testing.assert_array_equal(axpy(np.float32(2), x, x).get(), 3 * np.arange(6, dtype=np.float32))
        np.testing.assert_array_equal(axpy(0.5, x, 1).get(), 0.5 * np.arange(6, dtype=np.float32) + 1)
        refused(lambda: axpy(1, x, cupy.zeros(6, np.float64)), TypeError)  # T disagrees
        refused(lambda: axpy(1, x, x, cupy.zeros(6, np.int32)), TypeError)
        refused(lambda: axpy(1, x, np.zeros(6, np.float32)), TypeError)  # host array
        refused(lambda: axpy(1, x, x, np.zeros(6, np.float32)), TypeError)
        refused(lambda: axpy(1, x), TypeError)  # argument count

        # broadcasting, strided outputs, output allocation, size=, return_tuple
        two = cupy.ElementwiseKernel("T x, T y", "T s, T d", "s = x + y; d = x - y", "sum_diff")
        grid = cupy.arange(12, dtype=np.float64).reshape(3, 4)
        s, d = two(grid, cupy.arange(4, dtype=np.float64))
        np.testing.assert_array_equal(s.get(), grid.get() + np.arange(4))
        wide = cupy.zeros((3, 8))
        two(grid, 1.0, wide[:, ::2], wide[:, 1::2])
        np.testing.assert_array_equal(wide.get()[:, ::2], grid.get() + 1)
        fill = cupy.ElementwiseKernel("int64 v", "raw int64 out", "out[i] = v * i", "fill_raw")
        filled = cupy.zeros(5, dtype=np.int64)
        fill(3, filled, size=5)
        assert filled.get().tolist() == [0, 3, 6, 9, 12]
        refused(lambda: fill(3, filled), ValueError)  # loop size undecided
        refused(lambda: typed(grid[:, ::2], 6, cupy.empty(6)), NotImplementedError)  # raw must be contiguous
        assert isinstance(cupy.ElementwiseKernel("T x", "T y", "y = x", return_tuple=True)(x), tuple)

        # declarations, as in CuPy
        refused(lambda: cupy.ElementwiseKernel("raw float x", "T y", "y = 1"), ValueError)  # 'float' is no dtype name
        refused(lambda: cupy.ElementwiseKernel("T i", "T y", "y = i"), ValueError)
        refused(lambda: cupy.ElementwiseKernel("T x", "T y", "y = x", "bad name"), ValueError)
        refused(lambda: cupy.ElementwiseKernel("T x", "T y", "y = x +", "broken")(x), cupy.cuda.compiler.CompileException)

        calls = [json.loads(line) for line in open(os.environ["FAKE_CUPY_KERNEL_LOG"])]
        first = calls[0]
        assert first["name"] == "untyped_accumulator" and first["in_params"] == "raw T x, A zero, int64 n"
        assert first["args"] == [
            {"kind": "ndarray", "dtype": "float32", "ndim": 1, "c_contiguous": True},
            {"kind": "scalar", "python_type": "numpy", "dtype": "float32"},
            {"kind": "scalar", "python_type": "int", "dtype": None},
            {"kind": "ndarray", "dtype": "float32", "ndim": 1, "c_contiguous": True},
        ]
        assert calls[1]["args"][1] == {"kind": "scalar", "python_type": "float", "dtype": None}
        assert {"kind": "other", "type": "numpy.ndarray"} in [a for c in calls for a in c["args"]]
        print("OK")
    """, FAKE_CUPY_KERNEL_LOG=str(log)))


# -- devices, streams, events, memory ---------------------------------------------------------------

@pytest.mark.parametrize("env, visible", [
    ({"FAKE_CUPY_GPUS": "2", "CUDA_VISIBLE_DEVICES": "1"}, 1),
    ({"FAKE_CUPY_GPUS": "4", "CUDA_VISIBLE_DEVICES": "3,0,7,1"}, 2),  # CUDA stops at the invalid 7
    ({"FAKE_CUPY_GPUS": "3"}, 3),
    ({"CUDA_VISIBLE_DEVICES": ""}, 0),
])
def test_visible_devices_follow_cuda_visible_devices(env, visible):
    assert_ok(run_fake(f"""
        import cupy
        from cupy.cuda import runtime
        from dtrain.backend import gpu_available

        visible = {visible}
        assert gpu_available() == (visible > 0)
        if visible == 0:
            try:
                runtime.getDeviceCount()
            except runtime.CUDARuntimeError as err:
                assert err.status == 100 and str(err) == "cudaErrorNoDevice: no CUDA-capable device is detected"
            else:
                raise AssertionError("no device, yet a count")
        else:
            assert runtime.getDeviceCount() == visible and runtime.getDevice() == 0
            cupy.cuda.Device(visible - 1).use()
            assert runtime.getDevice() == visible - 1 and cupy.zeros(2).device.id == visible - 1
            cupy.cuda.Device(0).use()
            for select in (lambda: cupy.cuda.Device(visible).use(), lambda: cupy.cuda.Device(visible).__enter__(),
                           lambda: runtime.setDevice(-1)):
                try:
                    select()
                except runtime.CUDARuntimeError as err:
                    assert err.status == 101 and str(err) == "cudaErrorInvalidDevice: invalid device ordinal"
                else:
                    raise AssertionError("selected a device that is not visible")
            assert runtime.getDevice() == 0
        assert not hasattr(runtime, "errorPeerAccessAlreadyEnabled")  # CuPy 14 has none either
        print("OK")
    """, **env))


def test_peer_access_copies_streams_events_and_memory_pool():
    assert_ok(run_fake("""
        import ctypes, os, time, warnings
        import numpy as np
        import cupy
        from cupy._util import PerformanceWarning
        from cupy.cuda import runtime

        def status(fn):
            try:
                fn()
            except runtime.CUDARuntimeError as err:
                return err.status
            raise AssertionError(f"no error: {fn}")

        # peer access: explicit, twice (704), and implicit through an operation
        assert runtime.deviceCanAccessPeer(0, 1) == 1 and runtime.deviceCanAccessPeer(1, 1) == 0
        with cupy.cuda.Device(0):
            runtime.deviceEnablePeerAccess(1)
            assert status(lambda: runtime.deviceEnablePeerAccess(1)) == 704
            assert status(lambda: runtime.deviceEnablePeerAccess(0)) == 101
        on_0 = cupy.arange(4, dtype=np.float32)
        with cupy.cuda.Device(1), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            on_1 = on_0 + 1  # reads device 0 from device 1: CuPy enables 1 -> 0 itself, and warns
            assert on_1.device.id == 1 and [w.category for w in caught] == [PerformanceWarning]
            view = on_0[1:]  # a view computes nothing: no warning, and it stays on device 0
            assert view.device.id == 0 and len(caught) == 1
            assert status(lambda: runtime.deviceEnablePeerAccess(0)) == 704  # the implicit enabling counts
        os.environ["FAKE_CUPY_PEER_ACCESS"] = "0"  # GPUs without P2P
        try:
            on_1 + 1
        except ValueError as err:
            assert "Peer access is unavailable between these devices" in str(err)
        else:
            raise AssertionError("computed across devices without peer access")
        assert runtime.deviceCanAccessPeer(0, 1) == 0
        del os.environ["FAKE_CUPY_PEER_ACCESS"]

        # peer copies move raw bytes between live device arrays
        with cupy.cuda.Device(1):
            src = cupy.arange(4, dtype=np.float32) * 10
            stream = cupy.cuda.Stream(non_blocking=True)
        dst = cupy.zeros(4, dtype=np.float32)
        runtime.memcpyPeerAsync(dst.data.ptr, 0, src.data.ptr, 1, src.nbytes, stream.ptr)
        assert dst.get().tolist() == [0, 10, 20, 30]
        host = np.zeros(4, np.float32)
        assert status(lambda: runtime.memcpyPeer(host.ctypes.data, 0, src.data.ptr, 1, 16)) == 1
        assert status(lambda: runtime.memcpyPeer(dst.data.ptr, 1, src.data.ptr, 1, 16)) == 1  # dst is on 0
        assert status(lambda: runtime.memcpyPeerAsync(dst.data.ptr, 0, src.data.ptr, 1, 16, 12345)) == 400

        # streams: current per device and thread, only on their own device
        s = cupy.cuda.Stream(non_blocking=True)
        assert s.ptr not in (0, stream.ptr) and cupy.cuda.get_current_stream() == cupy.cuda.Stream.null
        with s:
            assert cupy.cuda.get_current_stream() is s
            ready = s.record()
            stream_event = cupy.cuda.Event(disable_timing=True)
            stream_event.record()
        assert cupy.cuda.get_current_stream() is cupy.cuda.Stream.null and s.done and ready.done
        s.wait_event(ready)
        with cupy.cuda.Device(1):
            try:
                with s:
                    raise AssertionError("entered a stream of device 0 on device 1")
            except RuntimeError as err:
                assert "does not match with the current device" in str(err)
            assert status(lambda: ready.record()) == 400  # an event of device 0 on device 1's stream

        # events time what happens between them, in milliseconds
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        time.sleep(0.02)
        end.record(cupy.cuda.get_current_stream())
        end.synchronize()
        assert 15 <= cupy.cuda.get_elapsed_time(start, end) < 2000
        assert status(lambda: cupy.cuda.get_elapsed_time(start, stream_event)) == 400  # timing disabled
        assert status(lambda: cupy.cuda.get_elapsed_time(start, cupy.cuda.Event())) == 400  # not recorded

        # the memory pool counts live arrays in 512-byte units and caches freed ones
        del on_0, on_1, src, dst, view
        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        used = pool.used_bytes()
        x = cupy.zeros(1000, dtype=np.float32)
        assert pool.used_bytes() == used + 4096 and pool.total_bytes() == used + 4096
        y = x[10:].reshape(10, 99)  # views allocate nothing
        assert pool.used_bytes() == used + 4096
        with cupy.cuda.Device(1):
            before_1 = pool.used_bytes()
            z = cupy.zeros(10)
            assert pool.used_bytes() == before_1 + 512
        del x, y
        assert pool.used_bytes() == used and pool.total_bytes() == used + 4096 and pool.free_bytes() == 4096
        again = cupy.empty(1024, dtype=np.float32)  # reuses the cached block
        assert pool.total_bytes() == used + 4096
        del again
        pool.free_all_blocks()
        assert pool.total_bytes() == pool.used_bytes() == used
        print("OK")
    """))


def test_dtrain_gpu_helpers_on_two_fake_gpus():
    """RowPartitioner's GPU branch (streams, events, peer access twice, peer copies), the
    CUDA event clock and the TF32 switch."""
    assert_ok(run_fake("""
        import time, warnings
        import numpy as np
        import cupy
        from cupy._util import PerformanceWarning
        from dtrain.nn.blocks import split_evenly
        from dtrain.parallel.row_partition import RowPartitioner
        from dtrain.precision import enable_tf32
        from dtrain.timeline import make_clock

        warnings.simplefilter("error", PerformanceWarning)
        rng = np.random.default_rng(0)
        a_host, b_host = rng.standard_normal((9, 6)), rng.standard_normal((6, 4))
        a, b = cupy.asarray(a_host), cupy.asarray(b_host)
        blocks = np.concatenate([a_host[start:stop] @ b_host for start, stop in split_evenly(9, 2)])
        for devices in ([0, 1], ["cuda:1", "cuda:0"]):  # the second one finds peer access enabled (704)
            with RowPartitioner(devices) as partitioner:
                out = cupy.empty((9, 4))
                assert partitioner(a, b, out) is out and out.device.id == 0
                np.testing.assert_array_equal(out.get(), blocks)
        with cupy.cuda.Device(1):
            a1, b1 = cupy.asarray(a_host), cupy.asarray(b_host)
            with RowPartitioner([0, 1]) as partitioner:
                product = partitioner(a1, b1)
            assert product.device.id == 1
            np.testing.assert_array_equal(product.get(), blocks)

        clock = make_clock(cupy)
        clock.record(0)
        time.sleep(0.01)
        clock.record(1)
        clock.settle(1)
        assert clock.seconds(1) - clock.seconds(0) >= 0.009
        assert clock.device_bytes() == cupy.get_default_memory_pool().total_bytes() > 0

        from cupy._core import _routines_linalg as linalg
        enable_tf32()
        assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32
        print("OK")
    """))


# -- NCCL over MPI ---------------------------------------------------------------------------------

@pytest.mark.mpi
def test_nccl_calls_on_raw_pointers_over_mpi():
    code = """
        import numpy as np
        import cupy
        from mpi4py import MPI
        from cupy.cuda import nccl

        rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        cupy.cuda.Device(rank).use()
        uid = MPI.COMM_WORLD.bcast(nccl.get_unique_id() if rank == 0 else None)
        comm = nccl.NcclCommunicator(size, uid, rank)
        assert (comm.rank_id(), comm.size(), comm.device_id()) == (rank, 2, rank)
        stream = cupy.cuda.Stream(non_blocking=True)
        types = {np.float16: nccl.NCCL_FLOAT16, np.float32: nccl.NCCL_FLOAT32, np.float64: nccl.NCCL_FLOAT64,
                 np.int32: nccl.NCCL_INT32, np.uint8: nccl.NCCL_UINT8}

        for dtype, kind in types.items():
            buf = cupy.arange(100, dtype=dtype) % 50 + rank
            comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, kind, nccl.NCCL_SUM, stream.ptr)
            np.testing.assert_array_equal(buf.get(), (np.arange(100) % 50) * 2 + 1)
        # float16: each sum is rounded once, as NCCL's two-rank sum
        values = [np.float16([0.1, 1.0, 2049.0, 1.0e4]) * np.float16(r + 1) for r in range(2)]
        half = cupy.asarray(values[rank])
        into = cupy.empty_like(half)
        comm.allReduce(half.data.ptr, into.data.ptr, 4, nccl.NCCL_FLOAT16, nccl.NCCL_SUM, 0)
        np.testing.assert_array_equal(into.get(), values[0] + values[1])
        top = cupy.asarray([rank, 5 - rank], dtype=np.int64)
        comm.allReduce(top.data.ptr, top.data.ptr, 2, nccl.NCCL_INT64, nccl.NCCL_MAX, stream.ptr)
        assert top.get().tolist() == [1, 5]

        # bcast in place from rank 1, into the middle of a bigger array
        whole = cupy.arange(10, dtype=np.float64) * (rank + 1)
        part = whole[2:6]
        comm.bcast(part.data.ptr, part.size, nccl.NCCL_FLOAT64, 1, stream.ptr)
        assert whole.get().tolist() == [0, rank + 1] + [4.0, 6.0, 8.0, 10.0] + [(rank + 1) * i for i in range(6, 10)]

        # send / recv
        if rank == 0:
            msg = cupy.asarray([3.5, 4.5], dtype=np.float32)
            comm.send(msg.data.ptr, 2, nccl.NCCL_FLOAT32, 1, stream.ptr)
        else:
            got = cupy.zeros(2, dtype=np.float32)
            comm.recv(got.data.ptr, 2, nccl.NCCL_FLOAT32, 0, stream.ptr)
            assert got.get().tolist() == [3.5, 4.5]

        # misuse that real NCCL rejects or crashes on
        def nccl_error(fn):
            try:
                fn()
            except nccl.NcclError as err:
                return err
            raise AssertionError(f"accepted: {fn}")

        host = np.zeros(4, np.float32)
        nccl_error(lambda: comm.allReduce(host.ctypes.data, host.ctypes.data, 4, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, 0))
        with cupy.cuda.Device(1 - rank):
            elsewhere = cupy.zeros(4, dtype=np.float32)
            other_stream = cupy.cuda.Stream()
        nccl_error(lambda: comm.bcast(elsewhere.data.ptr, 4, nccl.NCCL_FLOAT32, 0, stream.ptr))
        nccl_error(lambda: comm.bcast(top.data.ptr, 2, nccl.NCCL_INT64, 0, other_stream.ptr))
        nccl_error(lambda: comm.bcast(top.data.ptr, 2, nccl.NCCL_INT64, 2, stream.ptr))
        comm.destroy()
        nccl_error(lambda: comm.bcast(top.data.ptr, 2, nccl.NCCL_INT64, 0, stream.ptr))
        err = nccl_error(lambda: nccl.NcclCommunicator(size, nccl.get_unique_id(), rank))  # ids differ
        assert "different unique ids" in str(err)
        print(f"OK rank {rank}")
    """
    result = run_fake_mpi(["-n", "2", *python_command(code)], timeout=60)
    assert result.returncode == 0 and result.stdout.count("OK rank") == 2, result.output


@pytest.mark.mpi
def test_dtrain_nccl_communicator_and_reducers_on_two_fake_gpus():
    """tests/mpi_scripts/nccl_collectives.py (collectives, overlapped reducer, checks), as
    on a 2-GPU machine."""
    code = """
        import runpy, sys
        sys.path.insert(0, "tests/mpi_scripts")
        runpy.run_path("tests/mpi_scripts/nccl_collectives.py", run_name="__main__")
    """
    result = run_fake_mpi(["-n", "2", *python_command(code)], timeout=60, PYTHONWARNINGS="error::RuntimeWarning")
    assert result.returncode == 0 and result.stdout.count("OK rank") == 2, result.output


@pytest.mark.mpi
def test_ranks_need_distinct_physical_gpus_like_nccl():
    """Each rank with its own GPU through CUDA_VISIBLE_DEVICES works (dtrain then uses
    visible device 0 on every rank); two ranks on one GPU are refused, as NCCL does."""
    code = """
        import cupy
        from dtrain.comm.nccl import NcclCommunicator
        from cupy.cuda import nccl

        try:
            comm = NcclCommunicator(timeout_s=60)
        except nccl.NcclError as err:
            assert "Duplicate GPU detected" in str(err), err
            print("REFUSED", flush=True)
        else:
            assert comm.device_id == 0 and cupy.cuda.runtime.getDeviceCount() == 1
            buf = cupy.ones(3, dtype=cupy.float32) * (comm.rank + 1)
            comm.allreduce(buf, "sum")
            assert buf.get().tolist() == [3.0, 3.0, 3.0]
            comm.barrier()
            print(f"OK rank {comm.rank}", flush=True)
    """
    own = run_fake_mpi(["-n", "1", "-x", "CUDA_VISIBLE_DEVICES=1", *python_command(code), ":",
                        "-n", "1", "-x", "CUDA_VISIBLE_DEVICES=0", *python_command(code)], timeout=60)
    assert own.returncode == 0 and own.stdout.count("OK rank") == 2, own.output
    shared = run_fake_mpi(["-n", "2", *python_command(code)], timeout=60, FAKE_CUPY_GPUS="1")
    assert shared.returncode == 0 and shared.stdout.count("REFUSED") == 2, shared.output
