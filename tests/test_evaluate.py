"""Evaluation and prediction in bounded memory: the model runs on pieces of at most one
rank's training batch, whatever ``trainer.eval_batch_size`` is, with the same results."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from dtrain.comm.single import SingleCommunicator
from dtrain.config import config_dir, validate
from dtrain.context import build_context
from dtrain.data.loader import normalize
from dtrain.evaluate import evaluate, predict
from dtrain.nn.loss import SoftmaxCrossEntropy, accuracy_counts


def context(tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=[
            "model=lenet", "data=synthetic", "data.train_size=64", "data.test_size=203", "device=cpu",
            "dtype=float64", *overrides]))
    return build_context(cfg, tmp_path, SingleCommunicator(), "cpu", threads=1)


def record_forward_sizes(ctx) -> list[int]:
    sizes, forward = [], ctx.model.forward

    def recording(x):
        sizes.append(len(x))
        return forward(x)

    ctx.model.forward = recording
    return sizes


@pytest.mark.parametrize("eval_batch", [1, 50, 500])
def test_evaluation_runs_in_pieces_of_the_training_batch_with_the_whole_sets_metrics(tmp_path, eval_batch):
    ctx = context(tmp_path, "trainer.batch_size=32", f"trainer.eval_batch_size={eval_batch}")
    ds = ctx.test_set
    ctx.model.eval()
    logits = ctx.model.forward(normalize(ds, ds.images, np.float64))  # the whole set at once: the reference
    loss = float(SoftmaxCrossEntropy().forward(logits, ds.labels))
    correct, count = accuracy_counts(logits, ds.labels)
    sizes = record_forward_sizes(ctx)
    metrics = evaluate(ctx, ds)
    assert max(sizes) == min(eval_batch, 32) and sum(sizes) == len(ds) == 203
    assert metrics["samples"] == count and metrics["accuracy"] == correct / count
    assert metrics["loss"] == pytest.approx(loss, rel=1e-12)


def test_prediction_runs_in_pieces_and_writes_every_sample_in_order(tmp_path):
    ctx = context(tmp_path, "trainer.batch_size=16", "trainer.eval_batch_size=500")
    ds = ctx.test_set
    ctx.model.eval()
    expected = ctx.model.forward(normalize(ds, ds.images, np.float64)).argmax(axis=1)
    sizes = record_forward_sizes(ctx)
    out = tmp_path / "predictions.csv"
    assert predict(ctx, ds, out)["count"] == len(ds)
    assert max(sizes) == 16 and sum(sizes) == len(ds)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "Label"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, len(ds) + 1))
    assert [int(r[1]) for r in rows[1:]] == expected.tolist()
