"""A ReLU's output written by the layer before it straight into the columns of a convolution
whose windows tile it (``Conv2d.tiled_columns``, ``Sequential.forward``): the row map, the
bits it must not change, and when it happens and when not."""
from __future__ import annotations

import numpy as np
import pytest

from dtrain.nn import (
    Conv2d,
    Flatten,
    Linear,
    ReLU,
    Sequential,
    cpu_kernels,
    cuda_kernels,
)
from dtrain.nn.im2col import tiled_rows


@pytest.mark.parametrize("chw,kernel,padding", [
    ((3, 14, 14), (2, 2), (1, 1)),  # simple_cnn's conv2
    ((2, 8, 8), (2, 2), (0, 0)),  # simple_cnn's conv3
    ((2, 15, 13), (2, 2), (0, 0)),  # the last row and column under no window
    ((1, 7, 9), (3, 3), (1, 1)),
    ((2, 5, 5), (1, 1), (0, 0)),  # 1x1: the identity order
    ((2, 6, 7), (2, 3), (1, 0)),  # rectangular
])
def test_tiled_rows_put_each_input_where_im2col_does(rng, chw, kernel, padding):
    c, h, w = chw
    n = 3
    out_hw = ((h + 2 * padding[0] - kernel[0]) // kernel[0] + 1, (w + 2 * padding[1] - kernel[1]) // kernel[1] + 1)
    x = rng.normal(size=(c, h, w, n))
    cols = np.empty((c * kernel[0] * kernel[1], out_hw[0] * out_hw[1] * n))
    cpu_kernels.im2col(x, kernel, kernel, padding, out_hw, cols)
    rows = tiled_rows(chw, kernel, padding, out_hw)
    scattered = np.zeros_like(cols).reshape(-1, n)
    inside = rows >= 0
    scattered[rows[inside]] = x.reshape(-1, n)[inside]
    np.testing.assert_array_equal(scattered.reshape(cols.shape), cols)
    assert len(set(rows[inside].tolist())) == inside.sum()  # no two inputs share a row
    covered_h, covered_w = out_hw[0] * kernel[0] - padding[0], out_hw[1] * kernel[1] - padding[1]
    assert (~inside).sum() == c * (h * w - min(h, covered_h) * min(w, covered_w))


def simple_cnn_like(hw, padding, seed=5, dtype=np.float32):
    """simple_cnn's layer pattern: a direct first layer (32 filters of 2x2 on one channel),
    then two convolutions whose 2x2 stride-2 windows tile their input (the first of them with
    ``padding``), each after a ReLU."""
    r = np.random.default_rng(seed)
    convs = [Conv2d(1, 32, 2, stride=2, rng=r, dtype=dtype), ReLU(),
             Conv2d(32, 8, 2, stride=2, padding=padding, rng=r, dtype=dtype), ReLU(),
             Conv2d(8, 12, 2, stride=2, bias=False, rng=r, dtype=dtype), ReLU(), Flatten()]
    features = Sequential(*convs).output_shape((1, *hw))[0]
    return Sequential(*convs, Linear(features, 5, rng=r, dtype=dtype))


def run_steps(model, inputs, rng):
    """Forward and backward (input gradient too) on each input; everything each step gives."""
    results = []
    for x in inputs:
        out = model.forward(x)
        g = rng.normal(size=out.shape).astype(x.dtype)
        grad_in = model.backward(g)
        results.append((out.copy(), grad_in.copy(), [m.grads[k].copy() for _, m, k in model.named_parameters()]))
    return results


def im2col_channel_counts(monkeypatch):
    counts = []
    real = cpu_kernels.im2col

    def counting(x, *args, **kwargs):
        counts.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "im2col", counting)
    return counts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hw,padding", [((28, 28), 1), ((18, 14), 0), ((17, 13), 1)])
def test_writing_into_the_columns_changes_no_bit(monkeypatch, dtype, hw, padding):
    """The same model with and without the tiled writes: outputs, input gradients and every
    parameter gradient bit for bit, over batches that grow and shrink the column buffers
    (their padding entries must stay zero across steps); with them, the two tiled layers
    build no columns of their own. (18, 14): the direct first layer's last output row and
    column are under no window; (17, 13): the GEMM layer's."""
    monkeypatch.setattr(cpu_kernels, "DIRECT_CONV_MAX_MACS", 320)  # the first layer direct, the others GEMM
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(n, 1, *hw)).astype(dtype) for n in (5, 3, 5)]
    counts = im2col_channel_counts(monkeypatch)
    tiled = run_steps(simple_cnn_like(hw, padding, dtype=dtype), inputs, np.random.default_rng(1))
    assert 32 not in counts and 8 not in counts
    monkeypatch.setattr(cpu_kernels, "tiled_columns_pay", lambda kernel, stride, dtype: False)
    counts.clear()
    plain = run_steps(simple_cnn_like(hw, padding, dtype=dtype), inputs, np.random.default_rng(1))
    assert 32 in counts and 8 in counts
    for (out, grad_in, grads), (out_ref, grad_in_ref, grads_ref) in zip(tiled, plain):
        np.testing.assert_array_equal(out, out_ref)
        np.testing.assert_array_equal(grad_in, grad_in_ref)
        for got, want in zip(grads, grads_ref):
            np.testing.assert_array_equal(got, want)


def test_a_winograd_layer_writes_its_own_output_and_the_next_builds_its_columns(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "WINOGRAD_MIN_CHANNELS", 1)  # the 3x3 stride-1 layer runs as Winograd
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 2, 8, 8)).astype(np.float32)

    def make():
        r = np.random.default_rng(3)
        return Sequential(Conv2d(2, 4, 3, padding=1, rng=r), ReLU(), Conv2d(4, 24, 2, stride=2, rng=r))

    counts = im2col_channel_counts(monkeypatch)
    first = run_steps(make(), [x], np.random.default_rng(1))
    assert 4 in counts  # the tiled layer built its columns itself
    monkeypatch.setattr(cpu_kernels, "tiled_columns_pay", lambda kernel, stride, dtype: False)
    second = run_steps(make(), [x], np.random.default_rng(1))
    np.testing.assert_array_equal(first[0][0], second[0][0])
    np.testing.assert_array_equal(first[0][1], second[0][1])


def test_when_the_columns_are_offered():
    conv = Conv2d(4, 24, 2, stride=2)  # not direct: 24 filters x 16 taps
    like = np.empty((2, 4, 8, 8), np.float32)
    offered = conv.tiled_columns((4, 8, 8), 2, like)
    assert offered.cols.shape == (16, 4 * 4 * 2) and offered.shape == (4, 8, 8, 2) and not offered.cols.any()
    assert Conv2d(4, 24, 3, stride=2).tiled_columns((4, 8, 8), 2, like) is None  # windows overlap
    assert Conv2d(4, 24, 2, stride=3).tiled_columns((4, 8, 8), 2, like) is None  # gaps between windows
    assert Conv2d(4, 3, 2, stride=2).tiled_columns((4, 8, 8), 2, like) is None  # direct: it builds no columns
    assert conv.tiled_columns((4, 8, 8), 2, like.astype(np.float64)) is None  # another dtype than the layer's
    assert not cpu_kernels.tiled_columns_pay((2, 2), (2, 2), np.float16)  # the kernels compute float16 in float32
    assert not cuda_kernels.tiled_columns_pay((2, 2), (2, 2), np.float32)  # on the GPU every layer writes its own


def test_columns_for_another_shape_are_refused():
    producer = Conv2d(1, 4, 3, padding=1)
    into = Conv2d(4, 24, 2, stride=2).tiled_columns((4, 6, 6), 2, np.empty((2, 1, 6, 6), np.float32))
    with pytest.raises(ValueError, match=r"Conv2d\(1, 4.*columns to write its output into are for an input of"):
        producer.forward_relu_into(np.zeros((2, 1, 8, 8), np.float32), into)
