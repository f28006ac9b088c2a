"""The CUDA kernels of dtrain.nn.cuda_kernels against the CPU path.

Without a GPU, the kernels' bodies (plain C index arithmetic) are compiled with the host's
C compiler into a loop over the element index ``i`` and run on NumPy arrays, so their
index math, padding and accumulation order are checked on every machine with a compiler.
With a GPU, the real CuPy kernels run too.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from dtrain.backend import gpu_available
from dtrain.nn import AvgPool2d, MaxPool2d, cuda_kernels
from dtrain.nn.im2col import col2im, im2col, sliding_output_hw
from dtrain.nn.workspace import Workspace

C_TYPES = {"T": "double", "A": "double", "U": "unsigned char", "int64": "long long"}

# (N, C, H, W), kernel, stride, padding: odd sizes, rectangular kernels, strides that do
# not divide (H + 2P - K), padding up to half the kernel (what pooling allows).
CASES = [
    ((2, 3, 7, 6), (3, 3), (1, 1), (1, 1)),
    ((3, 2, 9, 8), (3, 2), (2, 3), (1, 1)),
    ((1, 4, 13, 13), (3, 3), (2, 2), (0, 0)),
    ((2, 2, 6, 7), (2, 3), (3, 2), (1, 0)),
    ((4, 1, 5, 5), (1, 1), (2, 2), (0, 0)),
]


def _params(spec: str) -> list[tuple[str, str, bool]]:
    """``"raw T x, int64 C"`` -> [(type, name, raw), ...]."""
    out = []
    for item in spec.split(","):
        words = item.split()
        out.append((words[-2], words[-1], words[0] == "raw"))
    return out


@pytest.fixture(scope="module")
def c_kernels(tmp_path_factory):
    """Each kernel body compiled as ``void name(long long size, inputs..., outputs...)`` looping over ``i``."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to run the kernel bodies on the host")
    src = ["#include <stdbool.h>", "typedef double T;", "typedef double A;", "typedef unsigned char U;"]
    signatures = {}
    for name, (inputs, outputs, body) in cuda_kernels.KERNELS.items():
        ins = _params(f"{inputs}, {cuda_kernels._GEOMETRY}")
        outs = _params(outputs)
        args = [f"const {C_TYPES[t]}* {n}" if raw else f"{C_TYPES[t]} {n}" for t, n, raw in ins]
        args += [f"{C_TYPES[t]}* {n}_out" for t, n, _ in outs]
        declare = " ".join(f"{C_TYPES[t]} {n};" for t, n, _ in outs)
        store = " ".join(f"{n}_out[i] = {n};" for _, n, _ in outs)
        src.append(f"void {name}(long long size, {', '.join(args)}) {{\n"
                   f"  for (long long i = 0; i < size; ++i) {{ {declare}\n{body}\n {store} }}\n}}")
        signatures[name] = (ins, outs)
    tmp = tmp_path_factory.mktemp("kernels")
    (tmp / "kernels.c").write_text("\n".join(src))
    subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-o", str(tmp / "kernels.so"), str(tmp / "kernels.c")],
                   check=True, capture_output=True, text=True)
    lib = ctypes.CDLL(str(tmp / "kernels.so"))

    def call(name: str, arrays: list[np.ndarray], geometry: tuple[int, ...], outputs: list[np.ndarray]) -> None:
        ins, outs = signatures[name]
        zero = [ctypes.c_double(0.0)] if any(n == "zero" for _, n, _ in ins) else []  # the accumulator's zero
        assert len(arrays) + len(zero) + len(geometry) == len(ins) and len(outputs) == len(outs)
        args = [a.ctypes.data_as(ctypes.c_void_p) for a in arrays] + zero + [ctypes.c_longlong(g) for g in geometry]
        args += [o.ctypes.data_as(ctypes.c_void_p) for o in outputs]
        getattr(lib, name)(ctypes.c_longlong(outputs[0].size), *args)

    return call


def _chwn(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


def _geometry(shape, kernel, stride, padding):
    n, c, h, w = shape
    out_hw = sliding_output_hw("test", (c, h, w), kernel, stride, padding)
    return out_hw, (c, h, w, n, *kernel, *stride, *padding, *out_hw)


@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
def test_im2col_and_col2im_bodies_match_the_cpu_path(c_kernels, rng, shape, kernel, stride, padding):
    x = rng.normal(size=shape)
    out_hw, geometry = _geometry(shape, kernel, stride, padding)
    expected = im2col(x, kernel, stride, padding, out_hw, Workspace())
    cols = np.empty_like(expected)
    c_kernels("im2col", [_chwn(x)], geometry, [cols])
    np.testing.assert_array_equal(cols, expected)

    g = rng.normal(size=cols.shape)
    expected_img = col2im(g, shape, kernel, stride, padding, out_hw)
    img = np.empty(_chwn(x).shape)
    c_kernels("col2im", [g], geometry, [img])
    np.testing.assert_array_equal(img, _chwn(expected_img))  # same terms, same order: same bits


@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
def test_max_pool_bodies_match_the_cpu_path(c_kernels, rng, shape, kernel, stride, padding):
    x = rng.normal(size=shape)
    x[0, 0, :2, :2] = 1.5  # ties: the first offset in order must win, on both paths
    layer = MaxPool2d(kernel, stride, padding)
    expected = layer.forward(x)
    out_hw, geometry = _geometry(shape, kernel, stride, padding)
    y = np.empty(_chwn(expected).shape)
    arg = np.empty(y.shape, dtype=np.uint8)
    c_kernels("max_pool_forward", [_chwn(x)], geometry, [y, arg])
    np.testing.assert_array_equal(y, _chwn(expected))
    np.testing.assert_array_equal(arg, layer._argmax(y.shape, np))  # the CPU path's winners

    g = rng.normal(size=expected.shape)
    expected_dx = layer.backward(g.copy())
    dx = np.empty(_chwn(x).shape)
    c_kernels("max_pool_backward", [_chwn(g), arg], geometry, [dx])
    np.testing.assert_array_equal(dx, _chwn(expected_dx))


@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
def test_avg_pool_bodies_match_the_cpu_path(c_kernels, rng, shape, kernel, stride, padding):
    x = rng.normal(size=shape)
    layer = AvgPool2d(kernel, stride, padding)
    expected = layer.forward(x)
    out_hw, geometry = _geometry(shape, kernel, stride, padding)
    y = np.empty(_chwn(expected).shape)
    c_kernels("avg_pool_forward", [_chwn(x)], geometry, [y])
    np.testing.assert_allclose(y, _chwn(expected), rtol=1e-15, atol=0)

    g = rng.normal(size=expected.shape)
    expected_dx = layer.backward(g.copy())
    dx = np.empty(_chwn(x).shape)
    c_kernels("avg_pool_backward", [_chwn(g)], geometry, [dx])
    np.testing.assert_allclose(dx, _chwn(expected_dx), rtol=1e-15, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="CuPy or a CUDA device is missing")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
def test_cupy_kernels_match_the_cpu_path(rng, dtype, shape, kernel, stride, padding):
    import cupy

    x = rng.normal(size=shape).astype(dtype)
    out_hw, _ = _geometry(shape, kernel, stride, padding)
    cols = cupy.empty((shape[1] * kernel[0] * kernel[1], out_hw[0] * out_hw[1] * shape[0]), dtype=dtype)
    cuda_kernels.im2col(cupy.asarray(_chwn(x)), kernel, stride, padding, out_hw, cols)
    expected = im2col(x, kernel, stride, padding, out_hw, Workspace())
    np.testing.assert_array_equal(cupy.asnumpy(cols), expected)
    img = cuda_kernels.col2im(cols, _chwn(x).shape, kernel, stride, padding, out_hw)
    expected_img = col2im(expected.copy(), shape, kernel, stride, padding, out_hw)
    np.testing.assert_allclose(cupy.asnumpy(img), _chwn(expected_img), rtol=1e-6 if dtype == np.float32 else 1e-13)
    for cls in (MaxPool2d, AvgPool2d):
        cpu, gpu = cls(kernel, stride, padding), cls(kernel, stride, padding)
        y_cpu, y_gpu = cpu.forward(x), gpu.forward(cupy.asarray(x))
        np.testing.assert_allclose(cupy.asnumpy(y_gpu), y_cpu, rtol=1e-6)
        g = rng.normal(size=y_cpu.shape).astype(dtype)
        np.testing.assert_allclose(cupy.asnumpy(gpu.backward(cupy.asarray(g))), cpu.backward(g.copy()), rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="CuPy or a CUDA device is missing")
@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
def test_cupy_kernels_take_float16_and_accumulate_in_float32(rng, shape, kernel, stride, padding):
    import cupy

    x = rng.normal(size=shape).astype(np.float16)
    reference = x.astype(np.float32)
    out_hw, _ = _geometry(shape, kernel, stride, padding)
    cols = cupy.empty((shape[1] * kernel[0] * kernel[1], out_hw[0] * out_hw[1] * shape[0]), dtype=np.float16)
    cuda_kernels.im2col(cupy.asarray(_chwn(x)), kernel, stride, padding, out_hw, cols)
    expected = im2col(reference, kernel, stride, padding, out_hw, Workspace())
    np.testing.assert_array_equal(cupy.asnumpy(cols).astype(np.float32), expected)
    img = cuda_kernels.col2im(cols, _chwn(x).shape, kernel, stride, padding, out_hw)
    expected_img = col2im(expected.copy(), shape, kernel, stride, padding, out_hw)
    np.testing.assert_allclose(cupy.asnumpy(img).astype(np.float32), _chwn(expected_img), rtol=2e-3, atol=2e-3)
    for cls in (MaxPool2d, AvgPool2d):
        cpu, gpu = cls(kernel, stride, padding), cls(kernel, stride, padding)
        y_cpu, y_gpu = cpu.forward(reference), gpu.forward(cupy.asarray(x))
        assert y_gpu.dtype == np.float16
        np.testing.assert_allclose(cupy.asnumpy(y_gpu).astype(np.float32), y_cpu, rtol=2e-3, atol=2e-3)
