"""The CUDA kernels of dtrain.nn.cuda_kernels against the CPU kernels, in float64, float32 and float16.

Without a GPU, the kernels' bodies (plain index arithmetic) and their accumulator
preamble are compiled with the host's C++ compiler into a loop over the element index
``i`` and run on NumPy arrays, so their index math, padding, accumulation type and order
are checked on every machine with a compiler. With a GPU, the real CuPy kernels run too.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from dtrain.backend import gpu_available
from dtrain.nn import AvgPool2d, MaxPool2d, cpu_kernels, cuda_kernels
from dtrain.nn.im2col import sliding_output_hw

# The arrays' dtype T -> its C++ type on the host (GCC's _Float16 for float16).
HOST_TYPES = {np.float64: "double", np.float32: "float", np.float16: "float16"}
PARAM_TYPES = {"U": "unsigned char", "int64": "long long"}
DTYPES = list(HOST_TYPES)

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
    """``call(dtype, name, arrays, geometry, outputs)``: the kernel bodies compiled with the
    host's C++ compiler, one library per array dtype, each body in a loop over the element
    index ``i``. The accumulator type comes from the kernels' own preamble."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to run the kernel bodies on the host")
    tmp = tmp_path_factory.mktemp("kernels")
    libs, signatures = {}, {}
    for dtype, ctype in HOST_TYPES.items():
        src = ["typedef _Float16 float16;", f"typedef {ctype} T;", "typedef unsigned char U;",
               cuda_kernels.ACCUMULATOR_PREAMBLE]
        for name, (inputs, outputs, body) in cuda_kernels.KERNELS.items():
            ins = _params(inputs)
            outs = _params(outputs)
            types = {"T": "T", "A": "A", **PARAM_TYPES}
            # Raw arrays as pointers; plain T inputs are arrays read at element i (relu_backward's y);
            # the int64 geometry by value.
            args = [f"const {types[t]}* {n}" if raw else f"const T* {n}_in" if t == "T" else f"{types[t]} {n}"
                    for t, n, raw in ins]
            args += [f"{types[t]}* {n}_out" for t, n, _ in outs]
            declare = " ".join([f"T {n} = {n}_in[i];" for t, n, raw in ins if t == "T" and not raw]
                               + [f"{types[t]} {n} = {n}_out[i];" for t, n, _ in outs])  # outputs may be read
            store = " ".join(f"{n}_out[i] = {n};" for _, n, _ in outs)
            src.append(f'extern "C" void {name}(long long size, {", ".join(args)}) {{\n'
                       f"  for (long long i = 0; i < size; ++i) {{ {declare}\n{body}\n {store} }}\n}}")
            signatures[name] = (ins, outs)
        path = tmp / f"kernels_{np.dtype(dtype).name}"
        path.with_suffix(".cpp").write_text("\n".join(src))
        subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-o", str(path.with_suffix(".so")),
                        str(path.with_suffix(".cpp"))], check=True, capture_output=True, text=True)
        libs[np.dtype(dtype)] = ctypes.CDLL(str(path.with_suffix(".so")))

    def call(dtype, name: str, arrays: list[np.ndarray], geometry: tuple[int, ...], outputs: list[np.ndarray]) -> None:
        ins, outs = signatures[name]
        assert len(arrays) + len(geometry) == len(ins) and len(outputs) == len(outs)
        for a in (*arrays, *outputs):
            assert a.flags.c_contiguous and a.dtype in (np.dtype(dtype), np.uint8), (a.dtype, dtype)
        args = [a.ctypes.data_as(ctypes.c_void_p) for a in arrays] + [ctypes.c_longlong(g) for g in geometry]
        args += [o.ctypes.data_as(ctypes.c_void_p) for o in outputs]
        getattr(libs[np.dtype(dtype)], name)(ctypes.c_longlong(outputs[0].size), *args)

    return call


def _chwn(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


def _geometry(shape, kernel, stride, padding):
    n, c, h, w = shape
    out_hw = sliding_output_hw("test", (c, h, w), kernel, stride, padding)
    return out_hw, (c, h, w, n, *kernel, *stride, *padding, *out_hw)


def _work(dtype) -> np.dtype:
    """The accumulator type of arrays of ``dtype``: float32 for float16, else the dtype itself."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


def _data(rng, shape, dtype) -> np.ndarray:
    return rng.normal(size=shape).astype(dtype)


# Every dtype: float64 and float32 against the CPU kernels in the same dtype; float16 against
# the CPU kernels in float32 (the kernels' accumulator) rounded to float16 once, as the CUDA
# kernels do. Copies, maxima and sums of the same terms in the same order give the same bits.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
def test_im2col_and_col2im_bodies_match_the_cpu_kernels(c_kernels, rng, dtype, shape, kernel, stride, padding):
    x = _chwn(_data(rng, shape, dtype))
    out_hw, geometry = _geometry(shape, kernel, stride, padding)
    rows, n, pixels = shape[1] * kernel[0] * kernel[1], shape[0], out_hw[0] * out_hw[1]
    for first, count in [(0, pixels), (1, pixels // 2), (pixels - 1, 1)]:  # all columns, and blocks
        expected = np.empty((rows, count * n), dtype=_work(dtype))
        cpu_kernels.im2col(x.astype(_work(dtype)), kernel, stride, padding, out_hw, expected, first)
        cols = np.empty((rows, count * n), dtype=dtype)
        c_kernels(dtype, "im2col", [x], (*geometry, first, count), [cols])
        np.testing.assert_array_equal(cols, expected.astype(dtype))

        g = _data(rng, cols.shape, dtype)
        expected_img = cpu_kernels.col2im_add(g.astype(_work(dtype)), np.zeros(x.shape, _work(dtype)), kernel,
                                              stride, padding, out_hw, first).astype(dtype)
        img = np.zeros(x.shape, dtype=dtype)
        c_kernels(dtype, "col2im", [g, img], (*geometry, first, count, 0, 0), [img])
        np.testing.assert_array_equal(img, expected_img)
        # col2im adds to what the image holds: a second block on top of the first
        c_kernels(dtype, "col2im", [g, img], (*geometry, first, count, 0, 0), [img])
        np.testing.assert_allclose(img.astype(np.float64), 2 * expected_img.astype(np.float64),
                                   rtol=float(np.finfo(dtype).eps) * 4)
        # fresh: what the image held is ignored; gated: then zeroed where the gate is <= 0, as the
        # CPU kernel does (its gate in float32 for float16, which compares alike)
        gate = np.maximum(_data(rng, x.shape, dtype), 0)
        expected_gated = cpu_kernels.col2im_add(g.astype(_work(dtype)), np.full(x.shape, np.nan, _work(dtype)),
                                                kernel, stride, padding, out_hw, first, fresh=True,
                                                gate=gate.astype(_work(dtype))).astype(dtype)
        np.testing.assert_array_equal(expected_gated, np.where(gate <= 0, 0, expected_img))
        img = np.full(x.shape, np.nan, dtype=dtype)
        c_kernels(dtype, "col2im", [g, gate], (*geometry, first, count, 1, 1), [img])
        np.testing.assert_array_equal(img, expected_gated)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
def test_max_pool_bodies_match_the_cpu_path(c_kernels, rng, dtype, shape, kernel, stride, padding):
    x = _data(rng, shape, dtype)
    x[0, 0, :2, :2] = 1.5  # ties: the first offset in order must win, on both paths
    layer = MaxPool2d(kernel, stride, padding)
    expected = layer.forward(x.astype(_work(dtype))).astype(dtype)
    out_hw, geometry = _geometry(shape, kernel, stride, padding)
    y = np.empty(_chwn(expected).shape, dtype=dtype)
    arg = np.empty(y.shape, dtype=np.uint8)
    c_kernels(dtype, "max_pool_forward", [_chwn(x)], (*geometry, 0), [y, arg])
    np.testing.assert_array_equal(y, _chwn(expected))
    np.testing.assert_array_equal(arg, layer._argmax(y.shape, np))  # the CPU path's winners

    g = _data(rng, expected.shape, dtype)
    expected_dx = layer.backward(g.astype(_work(dtype))).astype(dtype)
    dx = np.empty(_chwn(x).shape, dtype=dtype)
    c_kernels(dtype, "max_pool_backward", [_chwn(g), arg], geometry, [dx])
    np.testing.assert_array_equal(dx, _chwn(expected_dx))
    # After a ReLU (gated): windows whose maximum is <= 0 have no winner (offset kh*kw)
    relu_out = np.maximum(x, 0)
    relu_out[0, 0] = 0  # a channel whose windows all have the maximum 0
    gated = MaxPool2d(kernel, stride, padding)
    gated.forward_after_relu(relu_out.astype(_work(dtype)))
    c_kernels(dtype, "max_pool_forward", [_chwn(relu_out)], (*geometry, 1), [y, arg])
    expected_arg = gated._argmax(y.shape, np)
    np.testing.assert_array_equal(arg, expected_arg)
    assert (expected_arg == kernel[0] * kernel[1]).any() and (expected_arg < kernel[0] * kernel[1]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
def test_avg_pool_bodies_match_the_cpu_path(c_kernels, rng, dtype, shape, kernel, stride, padding):
    # The mean is a sum times 1/(kh*kw) on both paths, but the factor is rounded in each
    # path's own way: equal within one unit in the last place of the result type.
    ulp = float(np.finfo(dtype).eps)
    x = _data(rng, shape, dtype)
    layer = AvgPool2d(kernel, stride, padding)
    expected = layer.forward(x.astype(_work(dtype))).astype(dtype)
    out_hw, geometry = _geometry(shape, kernel, stride, padding)
    y = np.empty(_chwn(expected).shape, dtype=dtype)
    c_kernels(dtype, "avg_pool_forward", [_chwn(x)], geometry, [y])
    np.testing.assert_allclose(y.astype(np.float64), _chwn(expected).astype(np.float64), rtol=ulp, atol=0)

    g = _data(rng, expected.shape, dtype)
    expected_dx = layer.backward(g.astype(_work(dtype))).astype(dtype)
    dx = np.empty(_chwn(x).shape, dtype=dtype)
    c_kernels(dtype, "avg_pool_backward", [_chwn(g)], geometry, [dx])
    np.testing.assert_allclose(dx.astype(np.float64), _chwn(expected_dx).astype(np.float64), rtol=ulp, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("biased", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_bias_relu_body_and_cpu_kernel_are_numpys_add_and_maximum(c_kernels, rng, dtype, biased, relu):
    """A convolution's output pass: NumPy's ``y += bias[:, None]`` then ``maximum(y, 0)``, to
    the bit in both kernels (NaN, zeros and -inf included; float16 rounded once, as NumPy;
    the sign of a zero is not compared: NumPy's own loops differ on it)."""
    y = _data(rng, (6, 35), dtype)
    y.reshape(-1)[:4] = [np.nan, -0.0, -np.inf, 0.0]
    bias = _data(rng, 6, dtype)
    bias[1] = -0.0
    expected = y.copy()
    if biased:
        expected += bias[:, None]
    if relu:
        np.maximum(expected, 0, out=expected)
    got = cpu_kernels.bias_relu(y.copy(), bias if biased else None, relu)
    np.testing.assert_array_equal(got, expected)
    on_host = y.copy()
    c_kernels(dtype, "bias_relu", [bias if biased else on_host], (y.shape[1], int(biased), int(relu)), [on_host])
    np.testing.assert_array_equal(on_host, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_body_matches_the_cpu_kernel(c_kernels, rng, dtype):
    """PyTorch's rule in both: the gradient passes where the output is > 0 or NaN, is zeroed
    where it is 0, -0 or negative; the same bits on both sides."""
    y = np.maximum(_data(rng, (5, 7, 3), dtype), 0)
    y.reshape(-1)[:4] = [np.nan, -0.0, 0.0, np.inf]
    grad = _data(rng, y.shape, dtype)
    grad.reshape(-1)[4:6] = [np.nan, np.inf]
    expected = np.where(y <= 0, np.zeros_like(grad), grad)
    on_host = grad.copy()
    c_kernels(dtype, "relu_backward", [y], (), [on_host])
    np.testing.assert_array_equal(on_host, expected)
    for pieces in (grad.copy(), grad.copy().transpose(2, 0, 1)):  # 1-D, and arrays of other layouts
        got = cpu_kernels.relu_backward(pieces.reshape(-1) if pieces.flags.c_contiguous else pieces,
                                        y.reshape(-1) if pieces.flags.c_contiguous else y.transpose(2, 0, 1))
        np.testing.assert_array_equal(got.reshape(pieces.shape), expected if pieces.flags.c_contiguous
                                      else expected.transpose(2, 0, 1))


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="CuPy or a CUDA device is missing")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
def test_cupy_kernels_match_the_cpu_kernels(rng, dtype, shape, kernel, stride, padding):
    import cupy

    x = _chwn(rng.normal(size=shape).astype(dtype))
    out_hw, _ = _geometry(shape, kernel, stride, padding)
    cols = np.empty((shape[1] * kernel[0] * kernel[1], out_hw[0] * out_hw[1] * shape[0]), dtype=dtype)
    cpu_kernels.im2col(x, kernel, stride, padding, out_hw, cols)
    gpu_cols = cuda_kernels.im2col(cupy.asarray(x), kernel, stride, padding, out_hw, cupy.empty_like(cupy.asarray(cols)))
    np.testing.assert_array_equal(cupy.asnumpy(gpu_cols), cols)
    img = cuda_kernels.col2im_add(gpu_cols, cupy.zeros(x.shape, dtype), kernel, stride, padding, out_hw)
    expected_img = cpu_kernels.col2im_add(cols, np.zeros(x.shape, dtype), kernel, stride, padding, out_hw)
    np.testing.assert_array_equal(cupy.asnumpy(img), expected_img)
    nchw = x.transpose(3, 0, 1, 2)
    for cls in (MaxPool2d, AvgPool2d):
        cpu, gpu = cls(kernel, stride, padding), cls(kernel, stride, padding)
        y_cpu, y_gpu = cpu.forward(nchw), gpu.forward(cupy.asarray(nchw))
        np.testing.assert_allclose(cupy.asnumpy(y_gpu), y_cpu, rtol=1e-6)
        g = rng.normal(size=y_cpu.shape).astype(dtype)
        np.testing.assert_allclose(cupy.asnumpy(gpu.backward(cupy.asarray(g))), cpu.backward(g.copy()), rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="CuPy or a CUDA device is missing")
@pytest.mark.parametrize("shape, kernel, stride, padding", CASES)
def test_cupy_kernels_take_float16_and_accumulate_in_float32(rng, shape, kernel, stride, padding):
    import cupy

    x = _chwn(rng.normal(size=shape).astype(np.float16))
    reference = x.astype(np.float32)
    out_hw, _ = _geometry(shape, kernel, stride, padding)
    cols = cupy.empty((shape[1] * kernel[0] * kernel[1], out_hw[0] * out_hw[1] * shape[0]), dtype=np.float16)
    cuda_kernels.im2col(cupy.asarray(x), kernel, stride, padding, out_hw, cols)
    expected = np.empty(cols.shape, np.float32)
    cpu_kernels.im2col(reference, kernel, stride, padding, out_hw, expected)
    np.testing.assert_array_equal(cupy.asnumpy(cols).astype(np.float32), expected)
    img = cuda_kernels.col2im_add(cols, cupy.zeros(x.shape, np.float16), kernel, stride, padding, out_hw)
    expected_img = cpu_kernels.col2im_add(expected, np.zeros(x.shape, np.float32), kernel, stride, padding, out_hw)
    np.testing.assert_allclose(cupy.asnumpy(img).astype(np.float32), expected_img, rtol=2e-3, atol=2e-3)
    nchw = x.transpose(3, 0, 1, 2)
    for cls in (MaxPool2d, AvgPool2d):
        cpu, gpu = cls(kernel, stride, padding), cls(kernel, stride, padding)
        y_cpu, y_gpu = cpu.forward(reference.transpose(3, 0, 1, 2)), gpu.forward(cupy.asarray(nchw))
        assert y_gpu.dtype == np.float16
        np.testing.assert_allclose(cupy.asnumpy(y_gpu).astype(np.float32), y_cpu, rtol=2e-3, atol=2e-3)
