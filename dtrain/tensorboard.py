"""TensorBoard logging for training runs (a thin layer over ``tensorboardX.SummaryWriter``).

Tags written (``<name>`` is a state_dict name such as ``0.weight``):

- scalars: whatever :meth:`TBLogger.log_scalars` gets (the trainer writes ``train/loss``,
  ``train/accuracy``, ``train/lr``, ``train/images_per_sec`` every ``logging.log_interval``
  steps and ``eval/loss``, ``eval/accuracy`` at the end of each epoch, all against the step);
- histograms ``weights/<name>`` and ``grads/<name>`` every ``hist_interval`` steps;
- images ``inputs/samples`` (a grid of input samples) and ``filters/<name>`` (the first
  convolution's filters, one tile per output/input channel pair);
- hparams: the flattened config and the final metrics, in the ``hparams`` sub-run
  (``<logdir>/hparams``), the layout of ``SummaryWriter.add_hparams``.

A logger built with ``enabled=False`` (every rank but 0) creates no files and every
method returns at once.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dtrain.backend import to_host
from dtrain.checks import check_int
from dtrain.image_grid import make_grid
from dtrain.nn.flat import FlatParameters
from dtrain.nn.module import Array, Module

HPARAMS_RUN = "hparams"


def _summary_writer_class() -> type:
    """tensorboardX's ``SummaryWriter``, its module imported without PyTorch.

    tensorboardX imports ``torch`` when it is installed (the test extra installs it), only to
    accept torch tensors; that costs about 200 MB of resident memory in every run, and
    dtrain logs NumPy values. Hiding the module while tensorboardX loads makes its
    ``import torch`` fail as if PyTorch were absent; later imports of torch are unaffected.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


def histogram_stats(values: np.ndarray, bins: int = 64, block: int = 1 << 16) -> dict[str, Any] | None:
    """``add_histogram_raw``'s arguments for 1-D ``values``: ``bins`` equal buckets from
    min to max, and float64 sums. Read in blocks of ``block`` values, so a large layer's
    histogram needs no copy of it (tensorboardX's ``add_histogram`` makes two float64
    ones). None when ``values`` is empty or holds a NaN or an infinity."""
    if values.size == 0:
        return None
    low, high = float(values.min()), float(values.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    counts, edges = np.histogram(values, bins=bins, range=(low, high) if high > low else (low - 0.5, low + 0.5))
    total = squares = 0.0
    for start in range(0, values.size, block):
        part = values[start:start + block].astype(np.float64)
        total += float(part.sum())
        squares += float(part @ part)
    return {"min": low, "max": high, "num": int(values.size), "sum": total, "sum_squares": squares,
            "bucket_limits": edges[1:].tolist(), "bucket_counts": counts.tolist()}


class TBLogger:
    """Writes scalars, histograms, images and hparams of one run under ``logdir``.

    ``hist_interval``: :meth:`log_histograms` writes only at steps that are a multiple of
    it (0 turns histograms off; 1 writes at every call). ``max_images`` caps the input
    samples shown in the grid.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        enabled: bool = True,
        hist_interval: int = 1,
        max_images: int = 64,
        flush_secs: int = 30,
    ) -> None:
        check_int(hist_interval, "TBLogger: hist_interval", 0)
        check_int(max_images, "TBLogger: max_images", 0)
        self.logdir = Path(logdir)
        self.enabled = bool(enabled)
        self.hist_interval = hist_interval
        self.max_images = max_images
        self._writer = None
        self._last_histogram_step: int | None = None
        if self.enabled:
            self._writer = _summary_writer_class()(logdir=str(self.logdir), flush_secs=flush_secs)

    # -- scalars ---------------------------------------------------------------------
    def log_scalars(self, values: Mapping[str, Any], step: int) -> None:
        """One scalar per ``tag: value`` at ``step``; values must be real numbers."""
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, _real(tag, value), int(step))

    # -- histograms --------------------------------------------------------------------
    def log_histograms(self, flat: FlatParameters, step: int, every_step: bool = False) -> bool:
        """Histograms ``weights/<name>`` and ``grads/<name>`` of every flat buffer entry.

        Writes only when ``hist_interval > 0`` and ``step % hist_interval == 0`` (or, with
        ``every_step``, whatever the step), at most once per step; returns whether it wrote.
        Each buffer is copied to the host once (one transfer on GPU).
        """
        due = every_step or (self.hist_interval and step % self.hist_interval == 0)
        if self._writer is None or not self.hist_interval or not due or step == self._last_histogram_step:
            return False
        self._last_histogram_step = step
        for kind, buffer in (("weights", flat.params), ("grads", flat.grads)):
            host = to_host(buffer)
            for entry in flat.entries:
                stats = histogram_stats(host[entry.offset:entry.end])
                if stats is not None:  # nothing to draw for a NaN/Inf (a skipped step's gradient)
                    self._writer.add_histogram_raw(f"{kind}/{entry.name}", **stats, global_step=int(step))
        return True

    # -- images ----------------------------------------------------------------------
    def log_input_images(self, images: Array, step: int, tag: str = "inputs/samples") -> None:
        """A grid of the first ``max_images`` samples of an (N, H, W) or (N, C, H, W) batch.

        The whole grid is min-max scaled to [0, 1] jointly, so relative brightness
        between samples is kept; C must be 1 or 3.
        """
        if self._writer is None or self.max_images == 0:
            return
        x = to_host(images)[: self.max_images]
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(
                f"TBLogger.log_input_images expects (N, H, W) or (N, C, H, W) with C in (1, 3), "
                f"got shape {tuple(images.shape)}"
            )
        self._writer.add_image(tag, make_grid(x, normalize="all"), int(step), dataformats="CHW")

    def log_conv_filters(self, model: Module, step: int) -> str | None:
        """The first convolution's filters as a grid under ``filters/<name>``; returns the tag.

        The first parameter with a 4-D shape (out, in, kh, kw) is taken. With 3 input
        channels each filter is one RGB tile; otherwise every (out, in) slice is a gray
        tile, one row per output channel when ``in > 1``. Each tile is min-max scaled on
        its own (the pattern matters, not the magnitude) and enlarged to >= 24 pixels.
        Returns None (and writes nothing) for a model without convolutions.
        """
        if self._writer is None:
            return None
        found = next(((n, m.params[k]) for n, m, k in model.named_parameters() if m.params[k].ndim == 4), None)
        if found is None:
            return None
        name, weight = found
        w = to_host(weight)
        out_ch, in_ch, kh, kw = w.shape
        if in_ch == 3:
            tiles, nrow = w, None
        else:
            tiles, nrow = w.reshape(out_ch * in_ch, 1, kh, kw), (in_ch if in_ch > 1 else None)
        scale = max(1, math.ceil(24 / max(kh, kw)))
        tag = f"filters/{name}"
        grid = make_grid(tiles, nrow=nrow, padding=1, normalize="each", scale=scale)
        self._writer.add_image(tag, grid, int(step), dataformats="CHW")
        return tag

    def log_images(self, images: Array, model: Module, step: int) -> None:
        """:meth:`log_input_images` and :meth:`log_conv_filters` together."""
        self.log_input_images(images, step)
        self.log_conv_filters(model, step)

    # -- hparams -----------------------------------------------------------------------
    def log_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, float]:
        """Record the run's hyperparameters with its final metrics (TensorBoard's HPARAMS tab).

        ``hparams`` may be nested (a resolved config): keys are joined with dots
        (``optim.lr``); values other than bool/int/float/str are written as their
        ``str``. Of ``metrics`` only finite real numbers are kept, under ``hparam/<key>``
        (keys containing a ``/`` are kept as they are); anything else (strings, None,
        lists) is skipped. Returns the metric dict written.
        """
        written = {
            (key if "/" in key else f"hparam/{key}"): float(value)
            for key, value in metrics.items()
            if _is_real(value) and math.isfinite(float(value))
        }
        if self._writer is None:
            return written
        flat = {key: _hparam_value(value) for key, value in _flatten(hparams).items()}
        self._writer.add_hparams(flat, written, name=HPARAMS_RUN)
        return written

    # -- lifetime ----------------------------------------------------------------------
    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; later calls do nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TBLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _real(tag: str, value: Any) -> float:
    is_array_scalar = getattr(value, "ndim", None) == 0 and getattr(value, "dtype", np.dtype(object)).kind in "iuf"
    if _is_real(value) or is_array_scalar:  # 0-d NumPy/CuPy arrays, e.g. a loss left on the device
        return float(value)
    raise TypeError(f"TBLogger: scalar {tag!r} must be a real number, got {type(value).__name__} {value!r}")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, str)):
        return value
    if _is_real(value):
        return value.item() if isinstance(value, np.generic) else value
    return str(value)
