"""Conv2d: PyTorch parity, finite differences, im2col/col2im layout and adjointness, column blocks,
the skipped input gradient, workspace reuse, the direct kernels and when they run, errors.

Every test runs the im2col + GEMM path unless it asks for the ``algorithm`` fixture, which
runs it under each algorithm (im2col, direct, Winograd where the geometry allows it): most
of these layers are small enough that ``direct_conv_pays`` would pick the direct kernels by
itself, and too small for ``winograd_tile`` to pick Winograd. The Winograd transforms and
tile choice have their own tests in ``test_winograd.py``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from layer_checks import assert_matches_torch, layer_gradcheck

from dtrain.backend import to_host
from dtrain.nn import gemm
from dtrain.nn.conv import Conv2d
from dtrain.nn import cpu_kernels, cuda_kernels
from dtrain.nn.kernels import kernels_for
from dtrain.nn.workspace import Workspace

# (batch, in_channels, out_channels, H, W, kernel, stride, padding, bias)
CASES = [
    (1, 1, 1, 5, 5, 3, 1, 0, True),  # batch 1, single channel
    (2, 3, 4, 7, 9, (3, 2), (2, 3), (1, 2), True),  # rectangular kernel, stride and padding
    (3, 2, 5, 8, 8, 3, 1, 1, False),  # same padding, no bias
    (2, 4, 3, 6, 5, 1, 1, 0, True),  # 1x1 kernel
    (2, 3, 2, 10, 11, 4, 3, 2, True),  # (H + 2P - K) not divisible by the stride
    (1, 2, 3, 9, 7, (2, 5), (3, 2), (0, 1), False),  # rectangular everything, batch 1
    (4, 5, 6, 5, 5, 5, 2, 2, True),  # kernel as large as the input
    (2, 3, 4, 6, 6, 3, 1, 1, True),  # Winograd: F(3x3, 3x3) tiles that fit the output exactly
    (3, 2, 3, 7, 8, 3, 1, 1, False),  # Winograd: tiles overhanging the output's edge, no bias
    (2, 4, 2, 13, 13, 5, 1, 2, True),  # Winograd: a 5x5 kernel, AlexNet's conv2 geometry
    (1, 2, 2, 6, 7, 2, 1, 0, True),  # Winograd: a 2x2 kernel, the largest tile (alpha 7)
]
CASE_IDS = [f"n{c[0]}c{c[1]}f{c[2]}_{c[3]}x{c[4]}_k{c[5]}s{c[6]}p{c[7]}{'' if c[8] else '_nobias'}" for c in CASES]


@pytest.fixture(autouse=True)
def im2col_unless_asked(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "DIRECT_CONV_MAX_MACS", 0)
    monkeypatch.setattr(cpu_kernels, "WINOGRAD_MIN_CHANNELS", 1 << 40)


@pytest.fixture(params=["im2col", "direct", "direct-gemm-grad", "winograd"])
def algorithm(request, monkeypatch) -> str:
    """Run the test under each algorithm (on the GPU there is only im2col); "winograd" runs
    every layer that F(m x m, r x r) can run (square kernel, stride 1) that way; "direct"
    runs forward and the weight gradient direct, "direct-gemm-grad" only forward."""
    xp = request.getfixturevalue("xp") if "xp" in request.fixturenames else np
    if request.param != "im2col" and xp is not np:
        pytest.skip(f"the {request.param} kernels are CPU only")
    direct = request.param.startswith("direct")
    monkeypatch.setattr(cpu_kernels, "DIRECT_CONV_MAX_MACS", 1 << 40 if direct else 0)
    monkeypatch.setattr(cpu_kernels, "GEMM_WEIGHT_GRAD_FILTERS_PER_ROW", 1 << 40 if request.param == "direct" else 0)
    monkeypatch.setattr(cpu_kernels, "WINOGRAD_MIN_CHANNELS", 1 if request.param == "winograd" else 1 << 40)
    return request.param


def make_pair(case, rng, dtype):
    n, c, f, h, w, k, s, p, bias = case
    return Conv2d(c, f, k, stride=s, padding=p, bias=bias, rng=rng, dtype=dtype), rng.normal(size=(n, c, h, w))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_torch(xp, rng, dtype, case, algorithm):
    layer, x = make_pair(case, rng, dtype)
    _, c, f, _, _, k, s, p, bias = case
    assert_matches_torch(layer.to(xp), torch.nn.Conv2d(c, f, k, stride=s, padding=p, bias=bias),
                         x.astype(dtype), xp, rng)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_relu_is_forward_then_relu_bit_for_bit(xp, rng, dtype, case, algorithm):
    """The ReLU a layer applies as it writes its output (Sequential's fusion) gives the values
    of a separate ReLU (NumPy's maximum; NaN stays NaN) in every algorithm, to the bit but for
    the sign of zeros, on which NumPy's own loops differ."""
    layer, x = make_pair(case, rng, dtype)
    layer.to(xp)
    x = xp.asarray(x.astype(dtype))
    x[0, 0, 0, :] = np.nan  # the outputs of windows over the first row are NaN
    expected = to_host(layer.forward(x))
    np.maximum(expected, 0, out=expected)
    got = to_host(layer.forward_relu(x))
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(got).any() and (got == 0).any() and (got > 0).any()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("batch_last_input", [False, True])
def test_backward_through_relu_is_backward_then_relus_bit_for_bit(xp, rng, case, algorithm, batch_last_input):
    """The ReLU before the layer, run as col2im writes the input gradient (or after the
    Winograd transform), gives the bits of ReLU's own backward, in every algorithm, over one
    or several column blocks; the parameter gradients are untouched."""
    layer, x = make_pair(case, rng, np.float64)
    layer.to(xp)
    x = np.maximum(x, 0)  # the input is a ReLU's output
    x = xp.asarray(np.ascontiguousarray(x.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2) if batch_last_input else x)
    g = xp.asarray(rng.normal(size=(x.shape[0], *layer.output_shape(x.shape[1:]))))
    layer.forward(x)
    expected = to_host(layer.backward(g.copy()))
    expected[to_host(x) <= 0] = 0
    expected_grads = {k: to_host(v).copy() for k, v in layer.grads.items()}
    layer.forward(x)
    got = layer.backward_through_relu(g.copy())
    np.testing.assert_array_equal(to_host(got), expected)
    for k, v in layer.grads.items():
        np.testing.assert_array_equal(to_host(v), expected_grads[k])


def test_backward_through_relu_over_several_column_blocks(rng, monkeypatch, algorithm):
    monkeypatch.setattr(cpu_kernels, "COLUMN_BLOCK_BYTES", 2000)  # several blocks of output pixels or tiles
    layer, x = make_pair(CASES[8], rng, np.float64)
    x = np.maximum(x, 0)
    g = rng.normal(size=(x.shape[0], *layer.output_shape(x.shape[1:])))
    layer.forward(x)
    expected = layer.backward(g.copy())
    expected[x <= 0] = 0
    layer.forward(x)
    np.testing.assert_array_equal(layer.backward_through_relu(g.copy()), expected)


@pytest.mark.parametrize("case", [CASES[i] for i in (1, 2, 4, 7, 8, 10)], ids=[CASE_IDS[i] for i in (1, 2, 4, 7, 8, 10)])
def test_finite_differences(xp, rng, case, algorithm):
    layer, x = make_pair(case, rng, np.float64)
    layer_gradcheck(layer.to(xp), xp.asarray(x), rng)


def reference_cols(x: np.ndarray, kernel, stride, padding, out_hw) -> np.ndarray:
    """The column matrix by its definition (module docstring of dtrain.nn.im2col), element by element."""
    n, c, _, _ = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    cols = np.empty((c, *kernel, *out_hw, n), dtype=x.dtype)
    for ci, i, j, oh, ow, ni in np.ndindex(cols.shape):
        cols[ci, i, j, oh, ow, ni] = padded[ni, ci, oh * stride[0] + i, ow * stride[1] + j]
    return cols.reshape(c * kernel[0] * kernel[1], -1)


GEOMETRIES = [((3, 2), (2, 1), (1, 0)), ((1, 1), (2, 2), (0, 0)), ((3, 3), (1, 1), (2, 2)), ((2, 3), (1, 2), (1, 1))]


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
def test_im2col_blocks_hold_the_defined_columns_and_col2im_is_their_adjoint(xp, rng, kernel, stride, padding):
    x = rng.normal(size=(2, 3, 6, 5))
    oh = (6 + 2 * padding[0] - kernel[0]) // stride[0] + 1
    ow = (5 + 2 * padding[1] - kernel[1]) // stride[1] + 1
    expected = reference_cols(x, kernel, stride, padding, (oh, ow))
    source = xp.asarray(np.ascontiguousarray(x.transpose(1, 2, 3, 0)))
    kernels = kernels_for(source)
    rows, n = expected.shape[0], 2
    for first, count in [(0, oh * ow), (0, 1), (oh * ow - 2, 2), (1, oh * ow - 2)]:  # whole, and blocks
        cols = xp.empty((rows, count * n))
        kernels.im2col(source, kernel, stride, padding, (oh, ow), cols, first)
        np.testing.assert_array_equal(to_host(cols), expected[:, first * n:(first + count) * n])
        # <im2col(x), c> == <x, col2im(c)> for all x, c: the defining property of the pair.
        c = rng.normal(size=(rows, count * n))
        back = xp.zeros(source.shape)
        kernels.col2im_add(xp.asarray(c), back, kernel, stride, padding, (oh, ow), first)
        np.testing.assert_allclose(float((expected[:, first * n:(first + count) * n] * c).sum()),
                                   float((to_host(source) * to_host(back)).sum()), rtol=1e-12)


def test_col2im_adds_to_what_is_there(rng):
    source = np.ascontiguousarray(rng.normal(size=(2, 4, 4, 3)))
    cols = rng.normal(size=(2 * 9, 16 * 3))
    once = cpu_kernels.col2im_add(cols, np.zeros_like(source), (3, 3), (1, 1), (1, 1), (4, 4))
    twice = cpu_kernels.col2im_add(cols, once.copy(), (3, 3), (1, 1), (1, 1), (4, 4))
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_col2im_fresh_ignores_the_image_and_a_gate_is_relus_backward(rng, dtype):
    source = np.ascontiguousarray(rng.normal(size=(2, 4, 4, 3)).astype(dtype))
    cols = rng.normal(size=(2 * 9, 16 * 3)).astype(dtype)
    geometry = ((3, 3), (1, 1), (1, 1), (4, 4))
    expected = cpu_kernels.col2im_add(cols, np.zeros_like(source), *geometry)
    fresh = cpu_kernels.col2im_add(cols, np.full_like(source, np.nan), *geometry, fresh=True)
    np.testing.assert_array_equal(fresh, expected)
    gate = np.maximum(source, 0)
    gate[0, 0, 0, 0] = np.nan  # a NaN output of ReLU passes its gradient on, as in PyTorch
    gated = cpu_kernels.col2im_add(cols, np.full_like(source, np.nan), *geometry, fresh=True, gate=gate)
    np.testing.assert_array_equal(gated, np.where(gate <= 0, 0, expected))
    assert (gated == 0).any() and gated[0, 0, 0, 0] == expected[0, 0, 0, 0] != 0


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("kernel,stride,padding,hw", [
    ((2, 2), (2, 2), (1, 1), (6, 6)),  # simple_cnn's conv2: the windows tile the padded input
    ((2, 2), (2, 2), (0, 0), (5, 7)),  # the last row and column are in no window
    ((1, 2), (2, 3), (0, 1), (5, 7)),  # gaps between the windows
    ((3, 3), (3, 3), (1, 1), (7, 7)),
])
def test_col2im_of_windows_that_do_not_overlap_is_the_same_adjoint(rng, dtype, kernel, stride, padding, hw):
    """Windows no larger than the stride, all columns at once, fresh: col2im writes each input
    once (its own kernel) with the bits of adding into zeros (-0.0 becomes 0, NaN stays),
    gated as ReLU's backward, and zeroes the inputs no window covers."""
    oh = (hw[0] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    ow = (hw[1] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    cols = rng.normal(size=(2 * kernel[0] * kernel[1], oh * ow * 3)).astype(dtype)
    cols.reshape(-1)[::5], cols.reshape(-1)[::7] = -0.0, np.nan
    geometry = (kernel, stride, padding, (oh, ow))
    expected = cpu_kernels.col2im_add(cols, np.zeros((2, *hw, 3), dtype), *geometry)  # adds: the general kernel
    fresh = cpu_kernels.col2im_add(cols, np.full((2, *hw, 3), np.nan, dtype), *geometry, fresh=True)
    np.testing.assert_array_equal(fresh.view(np.uint8), expected.view(np.uint8))
    gate = rng.normal(size=expected.shape).astype(dtype)
    gated = cpu_kernels.col2im_add(cols, np.full_like(gate, np.nan), *geometry, fresh=True, gate=gate)
    np.testing.assert_array_equal(gated.view(np.uint8), np.where(gate <= 0, 0, expected).astype(dtype).view(np.uint8))
    assert np.isnan(gated).any() and (gated == 0).any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_results_do_not_depend_on_the_column_block_size(monkeypatch, rng, dtype):
    # Blocks of a few pixels (many blocks, the weight gradient summed over them) against one
    # block: the same convolution to rounding, and both against PyTorch.
    layer = Conv2d(3, 4, 3, stride=1, padding=1, rng=rng, dtype=dtype)
    x, g = rng.normal(size=(2, 3, 7, 6)).astype(dtype), rng.normal(size=(2, 4, 7, 6)).astype(dtype)
    results = {}
    for block_bytes in (3 * 9 * 2 * np.dtype(dtype).itemsize * 5, 1 << 30):  # 5 pixels a block; everything
        monkeypatch.setattr(cpu_kernels, "COLUMN_BLOCK_BYTES", block_bytes)
        y = layer.forward(x).copy()
        dx = layer.backward(g).copy()
        results[block_bytes] = (y, dx, layer.grads["weight"].copy(), layer.grads["bias"].copy())
    small, whole = results.values()
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for a, b in zip(small, whole):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(layer.params["weight"], requires_grad=True)
    torch.nn.functional.conv2d(xt, wt, torch.tensor(layer.params["bias"]), padding=1).backward(torch.tensor(g))
    np.testing.assert_allclose(small[2], wt.grad.numpy(), rtol=tol * 10, atol=tol * 10)
    np.testing.assert_allclose(small[1], xt.grad.numpy(), rtol=tol * 10, atol=tol * 10)


def test_the_input_gradient_can_be_skipped(rng, algorithm):
    layer = Conv2d(2, 3, 3, padding=1, rng=rng, dtype=np.float64)
    x, g = rng.normal(size=(2, 2, 5, 5)), rng.normal(size=(2, 3, 5, 5))
    layer.forward(x)
    layer.backward(g)
    weight_grad = layer.grads["weight"].copy()
    layer.forward(x)
    assert layer.backward(g, input_grad=False) is None
    np.testing.assert_array_equal(layer.grads["weight"], weight_grad)


@pytest.mark.blas
def test_workspaces_are_reused_but_results_are_fresh(rng):
    layer = Conv2d(2, 3, 3, padding=1, rng=rng, dtype=np.float64)
    x1, x2 = rng.normal(size=(1, 2, 4, 4)), rng.normal(size=(1, 2, 4, 4))
    g1, g2 = rng.normal(size=(1, 3, 4, 4)), rng.normal(size=(1, 3, 4, 4))
    y1 = layer.forward(x1)
    dx1 = layer.backward(g1)
    wg1 = layer.grads["weight"].copy()
    y1_kept, dx1_kept = y1.copy(), dx1.copy()
    y2 = layer.forward(x2)
    dx2 = layer.backward(g2)
    np.testing.assert_array_equal(y1, y1_kept)  # later calls must not write into earlier results
    np.testing.assert_array_equal(dx1, dx1_kept)
    assert not np.shares_memory(y1, y2) and not np.shares_memory(dx1, dx2)
    # Same input again (and a different batch size in between) reproduces the first results.
    layer.forward(rng.normal(size=(3, 2, 4, 4)))
    layer.backward(rng.normal(size=(3, 3, 4, 4)))
    np.testing.assert_array_equal(layer.forward(x1), y1_kept)
    np.testing.assert_array_equal(layer.backward(g1), dx1_kept)
    np.testing.assert_array_equal(layer.grads["weight"], wg1)


def test_backward_writes_grads_in_place(rng, algorithm):
    layer = Conv2d(2, 3, (2, 3), rng=rng, dtype=np.float64)
    flat = np.zeros(3 * 2 * 2 * 3 + 3)
    layer.grads["weight"] = flat[:36].reshape(3, 2, 2, 3)  # what a flat gradient buffer does
    layer.grads["bias"] = flat[36:]
    x, g = rng.normal(size=(2, 2, 5, 6)), rng.normal(size=(2, 3, 4, 4))
    layer.forward(x)
    layer.backward(g)
    xt = torch.tensor(x)
    wt = torch.tensor(layer.params["weight"], requires_grad=True)
    bt = torch.tensor(layer.params["bias"], requires_grad=True)
    torch.nn.functional.conv2d(xt, wt, bt).backward(torch.tensor(g))
    np.testing.assert_allclose(flat[:36].reshape(3, 2, 2, 3), wt.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(flat[36:], bt.grad.numpy(), rtol=1e-12)


def test_non_contiguous_weight_grad_is_refused(rng):
    layer = Conv2d(2, 3, 2, rng=rng, dtype=np.float64)
    layer.grads["weight"] = np.zeros((3, 2, 2, 4))[..., :2]  # a reshape would copy: the gradient would be lost
    layer.forward(rng.normal(size=(1, 2, 3, 3)))
    with pytest.raises(RuntimeError, match=r"grads\['weight'\] must be C-contiguous"):
        layer.backward(np.ones((1, 3, 2, 2)))


def test_all_gemms_go_through_gemm_matmul(rng):
    calls = []

    def recording(a, b, out):
        calls.append((a.shape, b.shape))
        return np.matmul(a, b, out=out)

    layer = Conv2d(2, 4, 3, rng=rng, dtype=np.float64)
    gemm.set_partitioner(recording)
    try:
        layer.forward(rng.normal(size=(5, 2, 6, 6)))
        layer.backward(np.ones((5, 4, 4, 4)))
    finally:
        gemm.set_partitioner(None)
    m = 5 * 4 * 4  # one block of columns at this size
    assert calls == [((4, 18), (18, m)), ((4, m), (m, 18)), ((18, 4), (4, m))]


def test_direct_layers_make_no_gemm_but_for_the_input_gradient(rng, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "DIRECT_CONV_MAX_MACS", 1 << 40)
    calls = []

    def recording(a, b, out):
        calls.append((a.shape, b.shape))
        return np.matmul(a, b, out=out)

    layer = Conv2d(2, 4, 3, rng=rng, dtype=np.float64)
    x, g = rng.normal(size=(5, 2, 6, 6)), rng.normal(size=(5, 4, 4, 4))
    gemm.set_partitioner(recording)
    try:
        layer.forward(x)
        layer.backward(g, input_grad=False)
        assert calls == []
        layer.forward(x)
        dx = layer.backward(g)
    finally:
        gemm.set_partitioner(None)
    assert calls == [((18, 4), (4, 5 * 4 * 4))]  # weight.T @ dY, one block
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.conv2d(xt, torch.tensor(layer.params["weight"])).backward(torch.tensor(g))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12)


def test_a_direct_layer_with_many_filters_per_tap_takes_the_gemm_for_its_weight_gradient(rng, monkeypatch):
    """simple_cnn's first layer (32 filters of 2x2 taps on one channel, stride 2) at the real
    thresholds: forward direct without a GEMM, the weight gradient as one GEMM over im2col's
    columns (never the direct kernel), the bias gradient as a GEMV; both match PyTorch."""
    monkeypatch.setattr(cpu_kernels, "DIRECT_CONV_MAX_MACS", 320)

    def refused(*args):
        raise AssertionError("the direct weight-gradient kernel ran")

    monkeypatch.setattr(cpu_kernels, "conv_direct_weight_grad", refused)
    calls = []

    def recording(a, b, out):
        calls.append((a.shape, b.shape))
        return np.matmul(a, b, out=out)

    layer = Conv2d(1, 32, 2, stride=2, rng=rng, dtype=np.float64)
    x, g = rng.normal(size=(3, 1, 8, 8)), rng.normal(size=(3, 32, 4, 4))
    gemm.set_partitioner(recording)
    try:
        layer.forward(x)
        assert calls == []
        assert layer.backward(g, input_grad=False) is None
    finally:
        gemm.set_partitioner(None)
    assert calls == [((32, 3 * 16), (3 * 16, 4))]  # dY @ cols.T
    w = torch.tensor(layer.params["weight"], requires_grad=True)
    b = torch.tensor(layer.params["bias"], requires_grad=True)
    torch.nn.functional.conv2d(torch.tensor(x), w, b, stride=2).backward(torch.tensor(g))
    np.testing.assert_allclose(layer.grads["weight"], w.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.grads["bias"], b.grad.numpy(), rtol=1e-12)


def sequential_direct_forward(x, weight, bias, stride, padding, relu):
    """The direct kernel's arithmetic written out in NumPy: per output, the bias, then each
    tap inside the image added in im2col row order (c, ki, kj), then ReLU."""
    c, h, w, n = x.shape
    f, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.empty((f, oh, ow, n), x.dtype)
    for i in range(oh):
        for j in range(ow):
            acc = np.repeat(bias[:, None], n, axis=1)
            for ch in range(c):
                for ki in range(kh):
                    for kj in range(kw):
                        r, s = i * sh + ki - ph, j * sw + kj - pw
                        if 0 <= r < h and 0 <= s < w:
                            acc = acc + weight[:, ch, ki, kj][:, None] * x[ch, r, s][None, :]
            y[:, i, j] = np.maximum(acc, 0) if relu else acc
    return y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geometry", [
    (1, 6, 6, 2, (1, 3), (1, 1), (0, 0)),  # 3 taps: fewer than one pass of four
    (1, 6, 7, 2, (1, 5), (1, 1), (0, 0)),  # 5 taps: a pass of four, then one
    (2, 5, 5, 3, 3, (1, 1), (1, 1)),  # 18 taps inside, 8 or 12 at the borders
    (1, 4, 4, 2, 1, (1, 1), (1, 1)),  # 1x1 with padding: border windows hold no tap at all
    (1, 8, 8, 3, 2, (2, 2), (0, 0)),  # simple_cnn's first layer: 2x2, stride 2
])
def test_direct_forward_adds_bias_then_taps_in_row_order(geometry, dtype, rng):
    """Bitwise: the direct kernel sums exactly as written out above (any tap count, windows
    partly or wholly in the padding), with and without the fused ReLU, NaN passing through."""
    c, h, w, f, k, stride, padding = geometry
    kh, kw = (k, k) if isinstance(k, int) else k
    x = rng.normal(size=(c, h, w, 5)).astype(dtype)
    x[0, 1, 1, 2] = np.nan
    weight, bias = rng.normal(size=(f, c, kh, kw)).astype(dtype), rng.normal(size=f).astype(dtype)
    for relu in (False, True):
        expected = sequential_direct_forward(x, weight, bias, stride, padding, relu)
        y = np.empty_like(expected)
        cpu_kernels.conv_direct_forward(x, weight, bias, stride, padding, y, relu)
        np.testing.assert_array_equal(y, expected)
        assert np.isnan(y).any()


def test_direct_kernels_run_where_the_gemm_is_memory_bound(monkeypatch):
    """The default threshold sends LeNet's and simple_cnn's first layers (on one image
    channel) to the direct kernels and keeps AlexNet's first and every deeper layer on im2col."""
    def direct(c, f, k):
        return Conv2d(c, f, k)._direct(np.empty((c, 8, 8, 2), np.float32))

    def direct_weight_grad(c, f, k):
        return Conv2d(c, f, k)._direct(np.empty((c, 8, 8, 2), np.float32), weight_grad=True)

    monkeypatch.undo()  # this module's fixture forces im2col; here the real threshold counts
    assert direct(1, 6, 5) and direct(1, 32, 2)
    assert not direct(1, 96, 5) and not direct(6, 16, 5) and not direct(32, 64, 2)
    # LeNet's first layer computes its weight gradient direct too, simple_cnn's (32 filters
    # of 4 taps) by im2col + GEMM; a layer that is not direct never is.
    assert direct_weight_grad(1, 6, 5) and not direct_weight_grad(1, 32, 2) and not direct_weight_grad(6, 16, 5)
    assert not cuda_kernels.direct_conv_pays(6, 25)  # on the GPU every convolution is im2col + cuBLAS
    assert not cuda_kernels.direct_weight_grad_pays(6, 25)


def test_init_is_seeded_and_kaiming_scaled():
    a = Conv2d(64, 32, 3, rng=np.random.default_rng(7))
    b = Conv2d(64, 32, 3, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.params["weight"], b.params["weight"])
    assert a.params["weight"].dtype == np.float32 and a.params["weight"].shape == (32, 64, 3, 3)
    fan_in = 64 * 9
    assert abs(a.params["weight"].std() / np.sqrt(2 / fan_in) - 1) < 0.03
    assert np.abs(a.params["bias"]).max() <= 1 / np.sqrt(fan_in)
    assert set(Conv2d(1, 2, 3, bias=False).params) == {"weight"}


def test_shapes_flops_and_repr():
    layer = Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2))
    assert layer.output_shape((3, 11, 10)) == (8, 6, 5)
    assert layer.flops((3, 11, 10)) == 2 * (8 * 6 * 5) * (3 * 3 * 5)
    assert layer.num_parameters() == 8 * 3 * 3 * 5 + 8
    assert repr(layer) == repr(torch.nn.Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2)))
    assert repr(Conv2d(1, 2, 3, bias=False)) == repr(torch.nn.Conv2d(1, 2, 3, bias=False))


def test_input_errors_name_the_layer_and_shapes():
    layer = Conv2d(3, 4, 5, padding=1, dtype=np.float64)
    name = r"Conv2d\(3, 4, kernel_size=\(5, 5\), stride=\(1, 1\), padding=\(1, 1\)\)"
    with pytest.raises(ValueError, match=name + r" expects a 4-D input \(N, C, H, W\), got shape \(3, 8, 8\)"):
        layer.forward(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=name + r" expects 3 input channels, got input of shape \(2, 8, 8\)"):
        layer.forward(np.zeros((1, 2, 8, 8)))
    with pytest.raises(ValueError, match=name + r": kernel 5x5 is larger than the padded input 4x9 "
                                              r"\(input shape \(3, 2, 7\), padding \(1, 1\)\)"):
        layer.forward(np.zeros((1, 3, 2, 7)))
    with pytest.raises(ValueError, match=name + r" got input shape \(3, 0, 7\) with a non-positive spatial size"):
        layer.output_shape((3, 0, 7))
    with pytest.raises(ValueError, match=name + r" expects a per-sample input shape \(C, H, W\), got \(3, 8\)"):
        layer.output_shape((3, 8))
    with pytest.raises(TypeError, match=name + r" got a float32 input but its parameters are float64"):
        layer.forward(np.zeros((1, 3, 8, 8), dtype=np.float32))


def test_backward_errors():
    layer = Conv2d(1, 2, 3, dtype=np.float64)
    with pytest.raises(RuntimeError, match=r"Conv2d\(1, 2.*backward needs a forward first"):
        layer.backward(np.zeros((1, 2, 3, 3)))
    layer.forward(np.zeros((1, 1, 5, 5)))
    with pytest.raises(ValueError, match=r"grad_out has shape \(1, 2, 4, 4\), the forward output was \(1, 2, 3, 3\)"):
        layer.backward(np.zeros((1, 2, 4, 4)))
    layer.forward(np.zeros((1, 1, 5, 5)))
    layer.backward(np.zeros((1, 2, 3, 3)))
    with pytest.raises(RuntimeError, match="each forward supports one backward"):
        layer.backward(np.zeros((1, 2, 3, 3)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=0), r"Conv2d: kernel_size and stride must be positive, got kernel_size=0"),
    (dict(kernel_size=(3, -1)), r"kernel_size and stride must be positive, got kernel_size=\(3, -1\)"),
    (dict(kernel_size=3, stride=0), r"kernel_size and stride must be positive.*stride=0"),
    (dict(kernel_size=3, padding=-1), r"Conv2d: padding must be non-negative, got -1"),
    (dict(kernel_size=2.5), r"Conv2d: kernel_size must be an int or a pair of ints, got 2.5"),
    (dict(kernel_size=(1, 2, 3)), r"Conv2d: kernel_size must be an int or a pair of ints"),
    (dict(kernel_size=3, init="he"), r"Conv2d\(2, 3, .*unknown init 'he'"),
    (dict(in_channels=0, kernel_size=3), r"Conv2d: in_channels must be an int >= 1, got 0"),
])
def test_constructor_errors(kwargs, match):
    args = dict(in_channels=2, out_channels=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Conv2d(**args)


def test_results_come_back_on_the_input_device(xp, rng):
    layer = Conv2d(2, 3, 3, rng=rng).to(xp)
    x = xp.asarray(rng.normal(size=(2, 2, 5, 5)), dtype=np.float32)
    y = layer.forward(x)
    dx = layer.backward(xp.ones_like(y))
    assert type(y) is type(x) and type(dx) is type(x)
    assert to_host(dx).shape == (2, 2, 5, 5)
