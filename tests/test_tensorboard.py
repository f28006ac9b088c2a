"""TBLogger writes events that TensorBoard's own reader finds with the right tags and values."""
from __future__ import annotations

import io
import math
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from dtrain.image_grid import make_grid, normalize_unit
from dtrain.nn.flat import FlatParameters
from dtrain.nn.module import Module, Sequential
from dtrain.tensorboard import HPARAMS_RUN, TBLogger, histogram_stats

EVERYTHING = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}


class Weights(Module):
    """A parameter holder standing in for a layer (only the parameter shapes matter here)."""

    def __init__(self, rng: np.random.Generator, **shapes: tuple[int, ...]) -> None:
        super().__init__()
        for key, shape in shapes.items():
            self.register_param(key, rng.normal(size=shape).astype(np.float32))


def read(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance=EVERYTHING)
    acc.Reload()
    return acc


def decode(image_event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)))


# -- the grid -------------------------------------------------------------------------------
def test_make_grid_places_tiles_row_major_with_padding():
    images = np.arange(5 * 1 * 2 * 3, dtype=np.float64).reshape(5, 1, 2, 3)
    grid = make_grid(images, nrow=3, padding=1, pad_value=0.5, normalize="none")
    assert grid.shape == (1, 2 * (2 + 1) + 1, 3 * (3 + 1) + 1)
    clipped = np.clip(images, 0, 1)
    np.testing.assert_array_equal(grid[:, 1:3, 1:4], clipped[0])
    np.testing.assert_array_equal(grid[:, 4:6, 5:8], clipped[4])  # row 1, column 1
    assert np.all(grid[:, 0, :] == 0.5) and np.all(grid[:, 4:6, 9:12] == 0.5)  # border, empty slot
    square = make_grid(np.zeros((10, 3, 4, 4)), padding=0, normalize="each")
    assert square.shape == (3, 3 * 4, 4 * 4)  # ceil(sqrt(10)) = 4 per row
    assert make_grid(np.ones((1, 1, 2, 2)), padding=0, scale=3).shape == (1, 6, 6)


def test_normalize_each_all_and_constant():
    x = np.stack([np.full((1, 2, 2), 3.0), np.array([[[0.0, 1.0], [2.0, 4.0]]])])
    each = normalize_unit(x, "each")
    np.testing.assert_array_equal(each[0], 0.0)  # constant image: zeros, no division by zero
    np.testing.assert_allclose(each[1], [[[0.0, 0.25], [0.5, 1.0]]])
    joint = normalize_unit(x, "all")
    np.testing.assert_allclose(joint[0], 0.75)
    assert joint.min() == 0.0 and joint.max() == 1.0
    with pytest.raises(ValueError, match="normalize must be"):
        normalize_unit(x, "per_pixel")


@pytest.mark.parametrize("shape", [(4, 2, 5, 5), (5, 5), (0, 1, 3, 3)])
def test_make_grid_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        make_grid(np.zeros(shape))


# -- the logger -----------------------------------------------------------------------------
def test_events_round_trip(tmp_path, rng):
    model = Sequential(Weights(rng, weight=(4, 1, 5, 5), bias=(4,)), Weights(rng, weight=(3, 7)))
    flat = FlatParameters(model)
    flat.grads[:] = rng.normal(size=flat.size)
    logdir = tmp_path / "tb"
    with TBLogger(logdir, hist_interval=2, max_images=6) as tb:
        for step in range(1, 4):
            tb.log_scalars({"train/loss": 1.0 / step, "train/accuracy": 0.1 * step, "train/lr": 0.01,
                            "train/images_per_sec": 500.0 + step}, step)
            tb.log_histograms(flat, step)  # writes at step 2 only
        tb.log_scalars({"eval/loss": 0.7, "eval/accuracy": 0.8, "eval/samples": np.int64(1000)}, 0)
        samples = rng.normal(size=(10, 28, 28))
        tb.log_input_images(samples, step=3)
        assert tb.log_conv_filters(model, step=3) == "filters/0.weight"
        written = tb.log_hparams(
            {"optim": {"name": "sgd", "lr": 0.02, "betas": [0.9, 0.999]}, "seed": 0, "threads": None},
            {"test_accuracy": 0.93, "steps": 3, "model": "lenet", "test_loss": None, "bad": math.nan},
        )
    assert written == {"hparam/test_accuracy": 0.93, "hparam/steps": 3.0}

    acc = read(logdir)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/accuracy", "train/lr", "train/images_per_sec",
                                    "eval/loss", "eval/accuracy", "eval/samples"}
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in loss], [1.0, 0.5, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/images_per_sec")], [501, 502, 503])
    assert [(e.step, e.value) for e in acc.Scalars("eval/samples")] == [(0, 1000.0)]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("eval/accuracy")] == [(0, 0.8)]

    names = ["0.weight", "0.bias", "1.weight"]
    assert set(tags["histograms"]) == {f"{k}/{n}" for k in ("weights", "grads") for n in names}
    for entry in flat.entries:
        for kind, buffer in (("weights", flat.params), ("grads", flat.grads)):
            events = acc.Histograms(f"{kind}/{entry.name}")
            assert [e.step for e in events] == [2]
            h = events[0].histogram_value
            values = buffer[entry.offset:entry.end].astype(np.float64)
            assert h.num == entry.size
            assert h.min == pytest.approx(values.min()) and h.max == pytest.approx(values.max())
            assert h.sum == pytest.approx(values.sum(), rel=1e-5, abs=1e-5)
            assert h.sum_squares == pytest.approx(values @ values, rel=1e-6)
            counts, _ = np.histogram(values, bins=len(h.bucket))
            assert list(h.bucket) == counts.tolist() and h.bucket_limit[-1] == pytest.approx(values.max())

    assert set(tags["images"]) == {"inputs/samples", "filters/0.weight"}
    shown = decode(acc.Images("inputs/samples")[0])
    expected = make_grid(samples[:6, None], normalize="all")  # max_images=6 -> 3 per row, 2 rows
    assert shown.shape[:2] == expected.shape[1:] == (2 * 30 + 2, 3 * 30 + 2)
    gray = shown[..., 0] if shown.ndim == 3 else shown
    np.testing.assert_allclose(gray.astype(float), np.clip(expected[0] * 255, 0, 255).astype(np.uint8), atol=1)
    filters = acc.Images("filters/0.weight")[0]
    tile = 5 * math.ceil(24 / 5)  # 5x5 kernels enlarged to >= 24 px
    assert (filters.height, filters.width) == (2 * (tile + 1) + 1, 2 * (tile + 1) + 1)  # 4 filters, 2 per row

    hp = read(logdir / HPARAMS_RUN)
    content = hp.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["optim.lr"].number_value == pytest.approx(0.02)
    assert values["optim.name"].string_value == "sgd"
    assert values["optim.betas"].string_value == "[0.9, 0.999]"
    assert values["threads"].string_value == "None"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert {m.name.tag for m in experiment.experiment.metric_infos} == {"hparam/test_accuracy", "hparam/steps"}
    assert hp.Scalars("hparam/test_accuracy")[0].value == pytest.approx(0.93)


def test_three_channel_filters_and_model_without_conv(tmp_path, rng):
    model = Sequential(Weights(rng, weight=(6, 3, 3, 3)), Weights(rng, weight=(2, 8)))
    with TBLogger(tmp_path) as tb:
        assert tb.log_conv_filters(model, 0) == "filters/0.weight"
        assert tb.log_conv_filters(Sequential(Weights(rng, weight=(2, 8))), 0) is None
        with pytest.raises(ValueError, match=r"got shape \(4, 2, 8, 8\)"):
            tb.log_input_images(np.zeros((4, 2, 8, 8)), 0)
        with pytest.raises(TypeError, match="'train/loss' must be a real number"):
            tb.log_scalars({"train/loss": "high"}, 0)
    image = read(tmp_path).Images("filters/0.weight")[0]
    assert (image.height, image.width) == (2 * (24 + 1) + 1, 3 * (24 + 1) + 1)  # 6 RGB tiles of 3x3 px x8, 3 per row


def test_hist_interval_zero_turns_histograms_off(tmp_path, rng):
    flat = FlatParameters(Sequential(Weights(rng, weight=(2, 2))))
    with TBLogger(tmp_path, hist_interval=0) as tb:
        assert not tb.log_histograms(flat, 0)
    assert read(tmp_path).Tags()["histograms"] == []
    with pytest.raises(ValueError, match="hist_interval"):
        TBLogger(tmp_path, hist_interval=-1)


def test_disabled_logger_is_a_no_op(tmp_path, rng):
    model = Sequential(Weights(rng, weight=(4, 1, 5, 5)))
    flat = FlatParameters(model)
    tb = TBLogger(tmp_path / "rank1", enabled=False)
    tb.log_scalars({"train/loss": 0.5}, 1)
    assert not tb.log_histograms(flat, 0)
    tb.log_images(np.zeros((2, 1, 5, 5)), model, 0)
    assert tb.log_conv_filters(model, 0) is None
    assert tb.log_hparams({"lr": 0.1}, {"acc": 0.5}) == {"hparam/acc": 0.5}
    tb.flush()
    tb.close()
    assert not (tmp_path / "rank1").exists()


def test_histograms_of_a_large_layer_copy_nothing_and_skip_non_finite_values(rng):
    values = rng.normal(size=4_000_000).astype(np.float32)  # 16 MB
    tracemalloc.start()
    try:
        stats = histogram_stats(values)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < values.nbytes / 2, f"{peak / 2**20:.1f} MiB for a histogram of {values.nbytes / 2**20:.0f} MiB"
    assert sum(stats["bucket_counts"]) == values.size and stats["max"] == values.max()
    assert stats["sum"] == pytest.approx(values.astype(np.float64).sum(), rel=1e-9)
    assert histogram_stats(np.full(5, 2.0, np.float32))["bucket_counts"] == [0] * 32 + [5] + [0] * 31
    assert histogram_stats(np.array([1.0, np.nan], np.float32)) is None
    assert histogram_stats(np.array([1.0, np.inf])) is None


def test_the_logger_leaves_pytorch_unimported(tmp_path):
    # tensorboardX imports torch when it is installed; a training run has no use for it.
    pytest.importorskip("torch", reason="the check needs PyTorch installed (the test extra)")
    code = ("import sys\nfrom dtrain.tensorboard import TBLogger\n"
            f"TBLogger({str(tmp_path)!r}).close()\nprint('torch' in sys.modules)\nimport torch\nprint(torch.ones(2).sum().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "2.0"]
