"""Evaluation and prediction, sharded over the ranks.

Each rank loads its share of every global batch of ``trainer.eval_batch_size`` samples per
rank (the :class:`~dtrain.data.DataLoader` in order, without augmentation) and runs the
model on it in pieces of at most one rank's training batch, so evaluation's activations
never outgrow training's, whatever the eval batch or the data set's size. Metrics are
reduced as exact counts (every sample counted once for any rank count); predictions are
gathered in sample order.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np

from dtrain.backend import Array, to_host
from dtrain.context import RunContext
from dtrain.data import DataLoader, Dataset
from dtrain.nn.loss import SoftmaxCrossEntropy, accuracy_counts

log = logging.getLogger("dtrain")


def _loader(ctx: RunContext, ds: Dataset) -> DataLoader:
    comm = ctx.comm
    return DataLoader(ds, global_batch=ctx.cfg.trainer.eval_batch_size * comm.size, rank=comm.rank,
                      world_size=comm.size, shuffle=False, drop_last=False, xp=ctx.xp, dtype=ctx.dtype, prefetch=0)


def _logits_in_pieces(ctx: RunContext, x: Array) -> Iterator[tuple[slice, Array]]:
    """``(rows, logits of x[rows])`` for consecutive pieces of ``x`` (N, ...), each at most
    one rank's share of the training batch: the layers keep their activations for a
    backward pass, so the piece, not the loaded batch, sets the memory evaluation needs."""
    piece = -(-ctx.cfg.trainer.batch_size // ctx.comm.size)
    for start in range(0, len(x), piece):
        rows = slice(start, start + piece)
        yield rows, ctx.model.forward(x[rows])


def evaluate(ctx: RunContext, ds: Dataset) -> dict[str, float]:
    """``{"loss", "accuracy", "samples"}`` of ``ctx.model`` (in eval mode) on ``ds``."""
    ctx.model.eval()
    loss_fn = SoftmaxCrossEntropy()
    totals = np.zeros(3, dtype=np.float64)  # loss sum, correct, count
    for batch in _loader(ctx, ds):
        for rows, logits in _logits_in_pieces(ctx, batch.x):
            labels = batch.y[rows]
            totals[0] += float(loss_fn.forward(logits, labels)) * len(labels)
            totals[1:] += accuracy_counts(logits, labels)
    totals = np.sum(ctx.comm.allgather_object(totals), axis=0)
    count = max(totals[2], 1.0)
    return {"loss": totals[0] / count, "accuracy": totals[1] / count, "samples": int(totals[2])}


def predict(ctx: RunContext, ds: Dataset, out_path: Path) -> dict[str, Any]:
    """Write ``ImageId,Label`` (1-based ids, Kaggle's submission format) for ``ds``."""
    ctx.model.eval()
    ids, labels = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for batch in _loader(ctx, ds):
        ids.append(batch.sample_ids)
        labels.extend(to_host(logits.argmax(axis=1)).astype(np.int64) for _, logits in _logits_in_pieces(ctx, batch.x))
    gathered = ctx.comm.allgather_object((np.concatenate(ids), np.concatenate(labels)))
    order = np.concatenate([i for i, _ in gathered])
    predicted = np.empty(len(ds), dtype=np.int64)
    predicted[order] = np.concatenate([p for _, p in gathered])
    if ctx.is_main:
        with open(out_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ImageId", "Label"])
            writer.writerows((i + 1, int(p)) for i, p in enumerate(predicted))
        log.info("wrote %d predictions to %s", len(predicted), out_path)
    return {"predictions": str(out_path), "count": len(predicted)}
