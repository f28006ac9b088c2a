"""Winograd convolutions: the transforms, which layers take them and with which tile, the
GEMMs they make, blocks of tiles, float32 accuracy at AlexNet's widths.

Conv2d's PyTorch parity and finite differences under Winograd run in ``test_conv.py`` (its
``algorithm`` fixture)."""
from __future__ import annotations

import numpy as np
import pytest

from dtrain.nn import cpu_kernels, cuda_kernels, gemm, winograd
from dtrain.nn.conv import Conv2d

SIZES = [(2, 2), (3, 2), (6, 2), (2, 3), (3, 3), (4, 3), (5, 3), (2, 5), (3, 5), (4, 4)]


@pytest.mark.parametrize("m, r", SIZES, ids=[f"F({m},{r})" for m, r in SIZES])
def test_transforms_compute_the_correlation(m, r, rng):
    at, g, bt = winograd.transforms(m, r)
    alpha = m + r - 1
    assert at.shape == (m, alpha) and g.shape == (alpha, r) and bt.shape == (alpha, alpha)
    np.testing.assert_array_equal(bt, np.round(bt))  # the input transform multiplies by integers
    for _ in range(3):
        d, w = rng.normal(size=alpha), rng.normal(size=r)
        expected = [d[i:i + r] @ w for i in range(m)]
        np.testing.assert_allclose(at @ ((g @ w) * (bt @ d)), expected, rtol=0, atol=1e-12)


def test_transforms_need_enough_interpolation_points():
    with pytest.raises(ValueError, match=r"F\(6, 5\) needs 9 interpolation points"):
        winograd.transforms(6, 5)


def tile(f, c, k, stride=1, out_hw=(6, 6), dtype=np.float32) -> int:
    return cpu_kernels.winograd_tile(f, c, (k, k) if isinstance(k, int) else k, (stride, stride), out_hw,
                                     np.dtype(dtype))


def test_winograd_runs_alexnets_wide_stride_one_layers():
    assert tile(256, 96, 5, out_hw=(13, 13)) == 3  # conv2: F(3x3, 5x5), 25 tiles of 7x7
    assert [tile(384, 256, 3), tile(384, 384, 3), tile(256, 384, 3)] == [3, 3, 3]  # conv3-5: 4 tiles of 5x5
    assert tile(96, 1, 5, out_hw=(28, 28)) == 0  # conv1: one input channel
    assert tile(64, 32, 2, stride=2, out_hw=(8, 8)) == 0  # simple_cnn: stride 2
    assert tile(16, 6, 5, out_hw=(10, 10)) == 0  # LeNet: few channels


def test_the_tile_is_the_one_with_fewest_products():
    # 13x13 outputs of a 3x3 kernel: 49 tiles of 4x4 (784 products per channel pair), 25 of
    # 5x5 (625), 16 of 6x6 (576), 9 of 7x7 (441): the last.
    assert tile(64, 64, 3, out_hw=(13, 13)) == 5
    assert tile(64, 64, 3, out_hw=(6, 6)) == 3  # 9 x 16, 4 x 25, 4 x 36: the tile that fits
    assert tile(64, 64, 3, out_hw=(1, 1)) == 0  # one 4x4 tile for 9 products: nothing saved


@pytest.mark.parametrize("reason, args", [
    ("rectangular kernel", {"k": (3, 5)}),
    ("stride 2", {"stride": 2}),
    ("1x1 kernel", {"k": 1}),
    ("kernel too large for a 7-point tile", {"k": 7}),
    ("float16", {"dtype": np.float16}),
    ("63 channels", {"c": 63}),
])
def test_layers_winograd_cannot_run_well_stay_on_im2col(reason, args):
    kwargs = {"f": 64, "c": 64, "k": 3} | args
    assert tile(**kwargs) == 0, reason
    assert tile(f=64, c=64, k=3) == 3


def test_the_gpu_never_takes_winograd():
    assert cuda_kernels.winograd_tile(384, 384, (3, 3), (1, 1), (6, 6), np.dtype(np.float32)) == 0


def recorded_gemms(layer: Conv2d, x: np.ndarray, g: np.ndarray, input_grad: bool = True):
    calls = []

    def recording(a, b, out):
        calls.append((a.shape, b.shape))
        return np.matmul(a, b, out=out)

    gemm.set_partitioner(recording)
    try:
        layer.forward(x)
        forward = len(calls)
        dx = layer.backward(g, input_grad=input_grad)
    finally:
        gemm.set_partitioner(None)
    return calls[:forward], calls[forward:], dx


def test_a_winograd_layer_makes_alpha_squared_gemms_per_product(rng):
    # 64 -> 64 channels, 6x6 output: F(3x3, 3x3), 25 transformed positions, 4 tiles of 2 samples.
    layer = Conv2d(64, 64, 3, padding=1, rng=rng, dtype=np.float64)
    x, g = rng.normal(size=(2, 64, 6, 6)), rng.normal(size=(2, 64, 6, 6))
    forward, backward, _ = recorded_gemms(layer, x, g)
    assert forward == [((64, 64), (64, 8))] * 25  # U[xi] @ V[xi]
    assert backward == [((64, 8), (8, 64)), ((64, 64), (64, 8))] * 25  # dM V^T, then U^T dM
    _, backward, dx = recorded_gemms(layer, x, g, input_grad=False)
    assert backward == [((64, 8), (8, 64))] * 25 and dx is None


def twin(layer: Conv2d, dtype) -> Conv2d:
    """A layer with ``layer``'s weights in ``dtype``."""
    other = Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, padding=layer.padding, dtype=dtype)
    for name, value in layer.params.items():
        other.params[name][...] = value
    return other


def run(layer: Conv2d, x: np.ndarray, g: np.ndarray):
    y = np.array(layer.forward(x))
    dx = np.array(layer.backward(g))
    return y, dx, layer.grads["weight"].copy(), layer.grads["bias"].copy()


def test_blocks_of_tiles_give_the_one_block_result(rng, monkeypatch):
    layer = Conv2d(64, 64, 3, padding=1, rng=rng, dtype=np.float64)
    x, g = rng.normal(size=(3, 64, 6, 6)), rng.normal(size=(3, 64, 6, 6))
    whole = run(layer, x, g)
    # 25 positions x 64 channels x 3 samples x 8 bytes per tile: one tile per block, 4 blocks.
    monkeypatch.setattr(cpu_kernels, "COLUMN_BLOCK_BYTES", 25 * 64 * 3 * 8)
    calls = []
    monkeypatch.setattr(cpu_kernels, "winograd_input",
                        lambda *a, fn=cpu_kernels.winograd_input: calls.append(a[5]) or fn(*a))
    blocked = run(layer, x, g)
    assert calls == [0, 1, 2, 3] * 2  # forward, then backward, tile by tile
    for a, b in zip(blocked, whole):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("c, f, k, p, hw", [(96, 128, 5, 2, 13), (384, 64, 3, 1, 6)], ids=["conv2", "conv4"])
def test_float32_accuracy_at_alexnet_widths(c, f, k, p, hw, rng, monkeypatch):
    """AlexNet's conv2 (F(3x3, 5x5), the largest tile) and conv4 geometries in float32
    against the same layer in float64 on im2col: within 1e-4 of the largest value (the
    transforms add rounding, measured about 1e-5; a wrong transform is off by order 1)."""
    layer = Conv2d(c, f, k, padding=p, rng=rng, dtype=np.float32)
    assert layer._winograd_tile(np.empty((c, hw, hw, 2), np.float32), (hw, hw)) == 3
    x, g = np.maximum(rng.normal(size=(2, c, hw, hw)), 0), rng.normal(size=(2, f, hw, hw))
    got = run(layer, x.astype(np.float32), g.astype(np.float32))
    monkeypatch.setattr(cpu_kernels, "WINOGRAD_MIN_CHANNELS", 1 << 40)
    expected = run(twin(layer, np.float64), x, g)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, expected):
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err < 1e-4, f"{name}: relative error {err:.1e}"
