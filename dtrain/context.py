"""What a run works with, built once at start-up: the checked config, the run directory,
the communicator, the device and its array module, the model and the data."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dtrain.backend import xp_for
from dtrain.comm import Communicator
from dtrain.config import RunConfig
from dtrain.data import Dataset, DatasetUnavailable, load_dataset
from dtrain.models import build_model
from dtrain.nn.module import Sequential
from dtrain.parallel.ordered import batch_norms
from dtrain.parallel.sync import make_stats_reducer

log = logging.getLogger("dtrain")


@dataclass
class RunContext:
    """Everything a training, evaluation or prediction run works with.

    ``device`` is ``cpu`` or ``gpu`` (``auto`` resolved), ``xp`` its array module,
    ``threads`` this process's thread budget; ``step`` and ``epoch`` say where training
    stands (a resumed run starts from the checkpoint's). ``test_set`` is labeled (what
    evaluation uses): a data set whose test split has no labels holds out part of its
    training split for it, and its unlabeled test split is ``predict_set``.
    """

    cfg: RunConfig
    run_dir: Path
    comm: Communicator
    device: str
    threads: int
    xp: ModuleType
    dtype: np.dtype
    model: Sequential
    train_set: Dataset | None
    test_set: Dataset | None
    predict_set: Dataset | None = None
    step: int = 0
    epoch: int = 0

    @property
    def is_main(self) -> bool:
        return self.comm.rank == 0

    @property
    def model_spec(self) -> dict[str, Any]:
        return self.cfg.model.model_dump()

    def split(self, name: str, purpose: str = "eval") -> Dataset:
        """The ``train`` or ``test`` split for ``purpose`` (``eval`` needs labels, ``predict``
        takes the unlabeled test split where there is one); a clear error when the data set
        has no such split."""
        if name == "train":
            ds = self.train_set
        elif purpose == "predict" and self.predict_set is not None:
            ds = self.predict_set
        else:
            ds = self.test_set
        if ds is None:
            raise ValueError(f"data {self.cfg.data.name!r} has no {name} split; choose trainer.split=train or test")
        return ds

    def build_model(self) -> Sequential:
        """A new model of the configured architecture, on the run's device, in the run's dtype."""
        return build_model(self.model_spec, seed=self.cfg.seed, dtype=self.dtype).to(self.xp, self.dtype)


def build_context(cfg: RunConfig, run_dir: Path, comm: Communicator, device: str, threads: int) -> RunContext:
    """The model (shape-checked against its input shape) and then the data of ``cfg``."""
    xp = xp_for(device)
    dtype = np.dtype(cfg.dtype)
    model = build_model(cfg.model.model_dump(), seed=cfg.seed, dtype=dtype).to(xp, dtype)
    if cfg.parallel.sync_batchnorm and comm.size > 1:
        reducer = make_stats_reducer(comm)
        for layer in batch_norms(model):
            layer.stats_reducer = reducer
    train_set, test_set = load_data(cfg, comm)
    predict_set = None
    if train_set is not None and test_set is not None and test_set.labels is None:
        train_set, test_set, predict_set = _hold_out(cfg, comm, train_set, test_set)
    for ds in (train_set, test_set, predict_set):
        if ds is not None:
            check_fit(cfg, model, ds)
    return RunContext(cfg=cfg, run_dir=run_dir, comm=comm, device=device, threads=threads, xp=xp,
                      dtype=dtype, model=model, train_set=train_set, test_set=test_set, predict_set=predict_set)


def check_fit(cfg: RunConfig, model: Sequential, ds: Dataset) -> None:
    """``ValueError`` in one line when the data's images or classes do not fit the model."""
    if tuple(ds.image_shape) != tuple(cfg.model.input_shape):
        raise ValueError(f"data {ds.name!r} has images of shape {tuple(ds.image_shape)} but model "
                         f"{cfg.model.name!r} takes input_shape {tuple(cfg.model.input_shape)}: use a model for "
                         f"{tuple(ds.image_shape)} images or other data")
    outputs = model.output_shape(tuple(cfg.model.input_shape))[0]
    if outputs < ds.num_classes:
        raise ValueError(f"data {ds.name!r} has {ds.num_classes} classes but model {cfg.model.name!r} has "
                         f"{outputs} outputs: its last layer needs out_features={ds.num_classes}")


def _hold_out(cfg: RunConfig, comm: Communicator, train: Dataset,
              test: Dataset) -> tuple[Dataset, Dataset | None, Dataset]:
    """(training set, labeled evaluation set, unlabeled test set) for a test split without
    labels: ``data.holdout`` of the training set, the same samples in every run (a fixed
    shuffle, not the run's seed), is kept back for evaluation."""
    n_holdout = int(round(len(train) * cfg.data.holdout))
    if n_holdout == 0 or n_holdout == len(train):
        if comm.rank == 0:
            log.info("%s: the test split has no labels; no evaluation during training (data.holdout=%g)",
                     train.name, cfg.data.holdout)
        return train, None, test
    order = np.random.default_rng(0).permutation(len(train))
    if comm.rank == 0:
        log.info("%s: the test split has no labels; evaluating on %d training samples held out (data.holdout=%g), "
                 "training on the other %d", train.name, n_holdout, cfg.data.holdout, len(train) - n_holdout)
    return train.take(np.sort(order[n_holdout:])), train.take(np.sort(order[:n_holdout])), test


def load_data(cfg: RunConfig, comm: Communicator) -> tuple[Dataset | None, Dataset | None]:
    """The train and test splits of ``cfg.data`` (None for a split the data set lacks, e.g.
    labels for Kaggle's test set). When the data can be had neither from disk nor by
    download, the run says so in one line and takes ``data.fallback`` instead."""
    d = cfg.data
    name, options = d.name, {"mirrors": d.mirrors, "image_shape": d.image_shape, "num_classes": d.num_classes}
    splits: dict[str, Dataset | None] = {}
    for split, size in (("train", d.train_size), ("test", d.test_size)):
        try:
            splits[split] = _load_split(cfg, comm, name, split, size, options)
        except DatasetUnavailable as err:
            if not d.fallback or name == d.fallback:
                raise
            if comm.rank == 0:
                # One line: each mirror's error is in the exception (data.fallback=null shows it).
                reason = str(err).split("; tried:")[0].splitlines()[0]
                log.warning("%s is not available (%s); training on %s instead (set data.fallback=null to fail "
                            "and see each mirror's error)", name, reason, d.fallback)
            name, options = d.fallback, {}  # options such as mirrors belong to the primary data set
            splits[split] = _load_split(cfg, comm, name, split, size, options)
    return splits["train"], splits["test"]


def _load_split(cfg: RunConfig, comm: Communicator, name: str, split: str, size: int | None,
                options: dict[str, Any]) -> Dataset | None:
    """Rank 0 loads (and downloads) first; the others then read the verified files."""
    d = cfg.data

    def load() -> Dataset | None:
        try:
            return load_dataset(name, split, root=d.root, download=d.download, cache_dir=d.cache_dir, size=size,
                                **options)
        except DatasetUnavailable:
            raise
        except FileNotFoundError:
            return None  # the data set has no such split

    if comm.rank == 0:
        result = load()
        comm.barrier()
        return result
    comm.barrier()
    return load()
