"""Evaluation and prediction, sharded over the ranks.

Each rank runs its share of every global batch of ``trainer.eval_batch_size`` samples per
rank (the :class:`~dtrain.data.DataLoader` in order, without augmentation), so memory is
bounded by the eval batch whatever the data set's size. Metrics are reduced as exact
counts (every sample counted once for any rank count); predictions are gathered in
sample order.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dtrain.backend import to_host
from dtrain.context import RunContext
from dtrain.data import DataLoader, Dataset
from dtrain.nn.loss import SoftmaxCrossEntropy, accuracy_counts

log = logging.getLogger("dtrain")


def _loader(ctx: RunContext, ds: Dataset) -> DataLoader:
    comm = ctx.comm
    return DataLoader(ds, global_batch=ctx.cfg.trainer.eval_batch_size * comm.size, rank=comm.rank,
                      world_size=comm.size, shuffle=False, drop_last=False, xp=ctx.xp, dtype=ctx.dtype, prefetch=0)


def evaluate(ctx: RunContext, ds: Dataset) -> dict[str, float]:
    """``{"loss", "accuracy", "samples"}`` of ``ctx.model`` (in eval mode) on ``ds``."""
    ctx.model.eval()
    loss_fn = SoftmaxCrossEntropy()
    totals = np.zeros(3, dtype=np.float64)  # loss sum, correct, count
    for batch in _loader(ctx, ds):
        if len(batch.sample_ids) == 0:
            continue
        logits = ctx.model.forward(batch.x)
        totals[0] += float(loss_fn.forward(logits, batch.y)) * len(batch.sample_ids)
        totals[1:] += accuracy_counts(logits, batch.y)
    totals = np.sum(ctx.comm.allgather_object(totals), axis=0)
    count = max(totals[2], 1.0)
    return {"loss": totals[0] / count, "accuracy": totals[1] / count, "samples": int(totals[2])}


def predict(ctx: RunContext, ds: Dataset, out_path: Path) -> dict[str, Any]:
    """Write ``ImageId,Label`` (1-based ids, Kaggle's submission format) for ``ds``."""
    ctx.model.eval()
    ids, labels = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for batch in _loader(ctx, ds):
        if len(batch.sample_ids):
            ids.append(batch.sample_ids)
            labels.append(to_host(ctx.model.forward(batch.x).argmax(axis=1)).astype(np.int64))
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
