"""The training run: set up, train, evaluate, checkpoint. Read it top to bottom.

:func:`run` is what ``python -m dtrain`` calls with the composed Hydra config and the run
directory. One process per rank executes it; with a world of one it is plain
single-process training.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dtrain.backend import resolve_device, to_host, xp_for
from dtrain.checkpoint import CheckpointManager, find_latest_run_checkpoint, load_checkpoint
from dtrain.data import Batch, DataLoader, Dataset, DatasetUnavailable, load_dataset, shard_indices
from dtrain.dist import Communicator, make_communicator
from dtrain.dist.buckets import GradientReducer, resolve_overlap
from dtrain.dist.guard import install_abort_on_exception
from dtrain.dist.ordered import OrderedChainReducer, chunk_range
from dtrain.dist.sync import broadcast_parameters, check_consistency, make_stats_reducer
from dtrain.models import build_model
from dtrain.nn import gemm
from dtrain.nn.batchnorm import BatchNorm1d, BatchNorm2d
from dtrain.nn.flat import FlatParameters
from dtrain.nn.loss import SoftmaxCrossEntropy, accuracy_counts
from dtrain.nn.module import Sequential
from dtrain.optim import LRSchedule, build_optimizer
from dtrain.parallel import enable_row_partition
from dtrain.parallel.workers import ComputeWorker, WorkerPool
from dtrain.precision import FullPrecision, PrecisionSettings, enable_tf32, make_precision
from dtrain.tensorboard import TBLogger
from dtrain.threads import set_blas_threads, thread_budget
from dtrain.timeline import ChromeTrace, PhaseTimer, format_breakdown, peak_host_rss_bytes, timeline_scalars

log = logging.getLogger("dtrain")


class NonFiniteLossError(RuntimeError):
    """The loss or the averaged gradient became NaN/Inf."""


@dataclass
class Run:
    """Everything a training, evaluation or prediction run works with."""

    cfg: DictConfig
    run_dir: Path
    comm: Communicator
    xp: Any
    dtype: Any
    model: Sequential
    train_set: Dataset | None
    test_set: Dataset | None
    precision: PrecisionSettings = field(default_factory=PrecisionSettings)
    threads: int = 1  # this process's thread budget
    step: int = 0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.comm.rank == 0


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Execute ``cfg.trainer.mode`` (train, eval or predict); returns the summary dict."""
    device = resolve_device(cfg.device)
    comm = make_communicator(cfg.parallel.backend, device, timeout_s=cfg.parallel.timeout_s,
                             devices_per_rank=cfg.parallel.devices_per_rank,
                             mpi_piece_bytes=int(cfg.parallel.mpi_piece_mb * 2**20))
    install_abort_on_exception(comm)
    set_blas_threads(thread_budget(cfg.threads, comm.size))
    devices = row_partition_devices(cfg.parallel, comm.local_rank, device)
    if len(devices) > 1:
        enable_row_partition(devices)
        if comm.rank == 0:
            log.info("row partitioning every Conv2d/Linear GEMM across devices %s on each rank", devices)
    try:
        return _run_mode(cfg, run_dir, comm)
    except BaseException:
        # Hydra catches exceptions before sys.excepthook sees them; on several ranks the
        # hook prints the error once and aborts every rank instead of leaving them hanging.
        if comm.size > 1:
            sys.excepthook(*sys.exc_info())
        raise


def _run_mode(cfg: DictConfig, run_dir: Path, comm: Communicator) -> dict[str, Any]:
    r = _setup(cfg, run_dir, comm)
    mode = cfg.trainer.mode
    if mode == "train":
        return train(r)
    if mode == "eval":
        _load_for_inference(r)
        metrics = evaluate(r, _split(r, cfg.trainer.split))
        if r.is_main:
            log.info("eval on %s: loss %.4f, accuracy %.4f", cfg.trainer.split, metrics["loss"], metrics["accuracy"])
            _write_json(run_dir / "eval.json", metrics)
        return metrics
    if mode == "predict":
        _load_for_inference(r)
        return predict(r, _split(r, cfg.trainer.split), run_dir / cfg.trainer.predictions)
    raise ValueError(f"trainer.mode must be train, eval or predict; got {mode!r}")


# -- set-up -----------------------------------------------------------------------------
def row_partition_devices(parallel: DictConfig, local_rank: int, device: str) -> list[int | str]:
    """The devices this rank splits its GEMMs across: ``parallel.row_partition.devices`` if
    set, else ``devices_per_rank`` of them (GPUs ``r*K .. r*K+K-1`` for node-local rank ``r``,
    or K CPU worker threads); a list of one or none means plain GEMMs."""
    if parallel.row_partition.devices:
        return list(parallel.row_partition.devices)
    k = parallel.devices_per_rank
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"parallel.devices_per_rank must be an int >= 1; got {k!r}")
    if device == "gpu":
        return [local_rank * k + i for i in range(k)] if k > 1 else []
    return [f"cpu:{i}" for i in range(k)] if k > 1 else []


def _setup(cfg: DictConfig, run_dir: Path, comm: Communicator) -> Run:
    device = resolve_device(cfg.device)
    xp = xp_for(device)
    dtype = np.dtype(cfg.dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {cfg.dtype!r}")
    precision = PrecisionSettings.from_config(OmegaConf.to_container(cfg.precision, resolve=True), device, dtype)
    if precision.tf32:
        enable_tf32()
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    model = build_model(spec, seed=cfg.seed, dtype=dtype).to(xp, dtype)
    if cfg.parallel.sync_batchnorm and comm.size > 1:
        reducer = make_stats_reducer(comm)
        for _, layer in model.named_modules():
            if isinstance(layer, (BatchNorm1d, BatchNorm2d)):
                layer.stats_reducer = reducer
    train_set, test_set = _load_data(cfg, comm)
    return Run(cfg=cfg, run_dir=run_dir, comm=comm, xp=xp, dtype=dtype, model=model,
               train_set=train_set, test_set=test_set, precision=precision,
               threads=thread_budget(cfg.threads, comm.size))


def _load_data(cfg: DictConfig, comm: Communicator) -> tuple[Dataset | None, Dataset | None]:
    """Both splits of ``cfg.data`` (rank 0 downloads first), falling back when configured."""
    d = cfg.data
    extra = {k: d[k] for k in ("image_shape", "num_classes") if k in d}
    if d.mirrors:
        extra["mirrors"] = list(d.mirrors)
    splits: dict[str, Dataset | None] = {}
    name = d.name
    for split, size in (("train", d.train_size), ("test", d.test_size)):
        try:
            splits[split] = _load_split(name, split, d, size, extra, comm)
        except DatasetUnavailable as err:
            if not d.fallback or name == d.fallback:
                raise
            if comm.rank == 0:
                # One line: the mirrors' individual errors are in the exception (data.fallback=null).
                reason = str(err).split("; tried:")[0].splitlines()[0]
                log.warning("%s is not available (%s); training on %s instead (set data.fallback=null to fail "
                            "and see each mirror's error)", name, reason, d.fallback)
            name, extra = d.fallback, {}  # options such as mirrors belong to the primary dataset
            splits[split] = _load_split(name, split, d, size, extra, comm)
    return splits["train"], splits["test"]


def _load_split(name: str, split: str, d: DictConfig, size: int | None, extra: dict, comm: Communicator):
    def load() -> Dataset | None:
        try:
            return load_dataset(name, split, root=d.root, download=d.download, cache_dir=d.cache_dir,
                                size=size, **extra)
        except DatasetUnavailable:
            raise
        except FileNotFoundError:
            return None  # e.g. a dataset without this split (kaggle test has no labels)

    # Rank 0 downloads alone; the others read the verified files afterwards.
    if comm.rank == 0:
        result = load()
        comm.barrier()
        return result
    comm.barrier()
    return load()


def _split(r: Run, split: str) -> Dataset:
    ds = r.train_set if split == "train" else r.test_set if split == "test" else None
    if ds is None:
        raise ValueError(f"trainer.split must be train or test with data available; got {split!r}")
    return ds


# -- training ---------------------------------------------------------------------------
def train(r: Run) -> dict[str, Any]:
    cfg, comm, xp, model = r.cfg, r.comm, r.xp, r.model
    tcfg = cfg.trainer
    if r.train_set is None:
        raise ValueError(f"data {cfg.data.name!r} has no training split")
    share = _deterministic_share(r) if cfg.parallel.deterministic else None
    if share is None and tcfg.batch_size % comm.size:
        raise ValueError(
            f"trainer.batch_size={tcfg.batch_size} (the global batch) must be divisible by the "
            f"number of ranks ({comm.size})"
        )
    flat = FlatParameters(model)
    optimizer = _make_optimizer(cfg, flat)
    loader = DataLoader(r.train_set, global_batch=tcfg.batch_size, rank=comm.rank, world_size=comm.size,
                        seed=cfg.seed, shuffle=True, drop_last=True, augment=cfg.data.augment,
                        xp=xp, dtype=r.dtype, prefetch=_prefetch_depth(cfg), share=share)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training set ({len(r.train_set.labels)} samples) is smaller than one global batch "
            f"(trainer.batch_size={tcfg.batch_size})"
        )
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    schedule = _make_schedule(cfg, total_steps)
    # float16 compute: forward/backward on a float16 twin of the (master) model; float32:
    # on the model itself, every hook of mp a no-op.
    mp = make_precision(r.precision, model, flat, OmegaConf.to_container(cfg.model, resolve=True), cfg.seed)
    ckpts = CheckpointManager(r.run_dir / "checkpoints", keep_last=tcfg.keep_last)
    _maybe_resume(r, optimizer, mp)
    broadcast_parameters(comm, model)
    comm.barrier()  # start the first step together, so its communication wait is not start-up skew
    reducer, chain = _make_reducer(r, flat, mp)
    worker = ComputeWorker(mp.model, mp.flat, mp)
    tb = TBLogger(r.run_dir / "tensorboard", enabled=r.is_main and cfg.logging.tensorboard,
                  hist_interval=cfg.logging.hist_interval)
    # Every step is timed by phase (the summary's breakdown); logging.timeline also keeps
    # each step for TensorBoard and a Chrome trace. Each rank writes its own trace file:
    # the one exception to "only rank 0 writes into the run directory".
    timer = PhaseTimer(xp, record_steps=cfg.logging.timeline)
    trace = (ChromeTrace(r.run_dir / f"timeline-rank{comm.rank}.json", comm.rank, comm.size)
             if cfg.logging.timeline else None)
    if r.is_main:
        log.info("model %s: %d parameters, %.3f GFLOP/image forward; %d ranks on %s; %d steps/epoch; precision %s%s",
                 cfg.model.name, model.num_parameters(), model.flops(tuple(cfg.model.input_shape)) / 1e9,
                 comm.size, resolve_device(cfg.device), steps_per_epoch, mp.describe(),
                 ", TF32 GEMMs" if r.precision.tf32 else "")
    images_seen, train_time, last_good = 0, 0.0, None
    model.train()
    # The step count alone says where a (resumed) run stands: which epoch, which batch.
    for epoch in range(r.step // steps_per_epoch, tcfg.epochs):
        if r.step >= total_steps:
            break
        loader.set_epoch(epoch, start_batch=r.step - epoch * steps_per_epoch)
        bar = _progress(r, loader, epoch, steps_per_epoch)
        run_loss, run_correct, run_count = 0.0, 0, 0
        epoch_start = time.perf_counter()
        for host_batch in timer.timed(loader.host_batches(), "data"):
            with timer.phase("h2d"):
                batch = loader.to_device(host_batch)
            lr = schedule.lr_at(r.step)
            optimizer.lr = lr
            if chain is not None:
                loss_sum, correct, count = chain.compute_gradients(batch, r.step, timer)
            else:
                loss_sum, correct, count = _compute_gradients(r, batch, worker, reducer, timer)
            loss_value = loss_sum / max(count, 1)
            # Checked on the averaged gradient, which every rank holds identically, so all
            # ranks take the same decision (a rank-local loss check could split them).
            finite = bool(xp.isfinite(flat.grads).all())
            overflow = mp.overflowed(finite)  # float16 under dynamic loss scaling: routine, scale backed off
            if not finite:
                if overflow:
                    if r.is_main:
                        log.debug("step %d: float16 gradient overflow; step skipped, loss scale now %g",
                                  r.step, mp.loss_scale)
                elif tcfg.on_nonfinite == "skip":
                    if r.is_main:
                        log.warning("step %d: non-finite gradient; step skipped", r.step)
                else:
                    raise NonFiniteLossError(
                        f"step {r.step}: the loss or gradient became non-finite (local loss={loss_value}); "
                        f"the last good checkpoint is {last_good or 'none yet'}. Lower optim.lr or set "
                        "trainer.on_nonfinite=skip"
                    )
                timer.end_step(r.step)
                r.step += 1
                if r.step >= total_steps:  # a skipped last step still ends the run
                    break
                continue
            with timer.phase("optimizer"):
                optimizer.step()
            dt = timer.end_step(r.step)  # waits for the step's device work; includes the data wait
            train_time += dt
            images_seen += tcfg.batch_size
            run_loss += loss_value * count
            run_correct += correct
            run_count += count
            r.step += 1
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{correct / max(count, 1):.3f}",
                                img_s=f"{tcfg.batch_size / dt:.0f}", lr=f"{lr:.4g}")
                bar.update(1)
            if r.step % cfg.logging.log_interval == 0:
                tb.log_scalars({"train/loss": loss_value, "train/accuracy": correct / max(count, 1),
                                "train/lr": lr, "train/images_per_sec": tcfg.batch_size / dt}, r.step)
                if trace is not None:
                    _publish_timeline(r, timer, trace, tb)
            tb.log_histograms(flat, r.step)
            if cfg.parallel.check_interval and comm.size > 1 and r.step % cfg.parallel.check_interval == 0:
                check_consistency(comm, flat, r.step)
            if tcfg.checkpoint_every and r.step % tcfg.checkpoint_every == 0:
                last_good = _save(r, ckpts, optimizer, mp)
            if r.step >= total_steps:
                break
        if bar is not None:
            bar.close()
        metrics = evaluate(r, r.test_set) if r.test_set is not None and r.test_set.labels is not None else {}
        model.train()
        epoch_stats = {"epoch": epoch, "step": r.step,
                       "train_loss": run_loss / max(run_count, 1), "train_accuracy": run_correct / max(run_count, 1),
                       "epoch_seconds": time.perf_counter() - epoch_start}
        epoch_stats.update({f"test_{k}": v for k, v in metrics.items()})
        r.history.append(epoch_stats)
        if r.is_main:
            tb.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, r.step)
            if epoch == r.history[0]["epoch"] and cfg.logging.images:
                tb.log_images(r.train_set.images[:64], model, r.step)
            log.info("epoch %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f", epoch,
                     epoch_stats["train_loss"], epoch_stats["train_accuracy"],
                     metrics.get("loss", math.nan), metrics.get("accuracy", math.nan))
        r.epoch = r.step // steps_per_epoch
    if trace is not None:
        _publish_timeline(r, timer, trace, tb)
        trace.close()
    if chain is not None:
        chain.pool.close()
    last_good = _save(r, ckpts, optimizer, mp)
    summary = _summary(r, images_seen, train_time, last_good, timer, mp)
    if r.is_main:
        tb.log_hparams(OmegaConf.to_container(cfg, resolve=True), summary)
        _write_json(r.run_dir / "summary.json", summary)
        log.info("done: test accuracy %s, %.1f images/s, %d steps, checkpoint %s; precision %s",
                 f"{summary['test_accuracy']:.4f}" if summary["test_accuracy"] is not None else "n/a",
                 summary["images_per_sec"], r.step, last_good, _precision_line(summary["precision"]))
        log.info("performance (rank 0): %s", _performance_line(summary))
    tb.close()
    return summary


def _prefetch_depth(cfg: DictConfig) -> int:
    """``data.prefetch``, or by default 2 batches on GPU and none on CPU: there a background
    thread preparing batches takes a core from the BLAS threads, and OpenBLAS's threads,
    which wait for each other at every GEMM, then slow the whole step down (measured: lenet
    with augmentation, 2 BLAS threads on 2 cores, 12 ms per step without the thread and
    260 ms with it)."""
    if cfg.data.prefetch is not None:
        return int(cfg.data.prefetch)
    return 2 if resolve_device(cfg.device) == "gpu" else 0


def _make_optimizer(cfg: DictConfig, flat: FlatParameters):
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items()
              if k not in ("name", "schedule")}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return build_optimizer(cfg.optim.name, flat, **kwargs)


def _make_schedule(cfg: DictConfig, total_steps: int) -> LRSchedule:
    s = cfg.optim.schedule
    return LRSchedule(base_lr=cfg.optim.lr, kind=s.kind, total_steps=total_steps, warmup_steps=s.warmup_steps,
                      step_size=s.step_size, gamma=s.gamma, min_lr=s.min_lr)


def _deterministic_share(r: Run) -> tuple[int, int]:
    """The samples of every global batch that this rank computes in deterministic mode:
    its run of whole micro-batches."""
    p, batch = r.cfg.parallel, r.cfg.trainer.batch_size
    if batch % p.deterministic_chunks:
        raise ValueError(
            f"parallel.deterministic=true splits the global batch into parallel.deterministic_chunks="
            f"{p.deterministic_chunks} micro-batches; trainer.batch_size={batch} must be a multiple of it"
        )
    first, stop = chunk_range(p.deterministic_chunks, r.comm.rank, r.comm.size)
    size = batch // p.deterministic_chunks
    return first * size, stop * size


def _make_reducer(r: Run, flat: FlatParameters,
                  mp: FullPrecision) -> tuple[GradientReducer | None, OrderedChainReducer | None]:
    """The gradient averaging strategy: bucketed all-reduce, or the deterministic chain."""
    p, comm = r.cfg.parallel, r.comm
    overlap = resolve_overlap(p.overlap, comm.name)  # checked in a world of one too
    if overlap and mp.mixed and comm.size > 1 and not p.deterministic:
        # Buckets start from backward hooks, but float16 gradients reach the float32 master
        # buffer only in mp.grads_to_master() after the whole backward pass.
        if r.is_main:
            log.info("precision.compute=float16: gradient all-reduce without overlap (parallel.overlap ignored)")
        overlap = False
    if p.deterministic:
        if p.sync_batchnorm and comm.size > 1:
            raise ValueError(
                "parallel.sync_batchnorm=true does not combine with parallel.deterministic=true: there BatchNorm "
                "normalizes each micro-batch by its own statistics (whichever rank computes it) and every rank "
                "applies all micro-batches' running statistics in one order; set parallel.sync_batchnorm=false"
            )
        first, stop = chunk_range(p.deterministic_chunks, comm.rank, comm.size)
        # One micro-batch per core at a time; on a GPU, or with GEMMs split over row
        # partitions (which bring their own threads), one at a time.
        workers = 1 if r.xp is not np or gemm.partitioned() else min(r.threads, stop - first)
        spec = OmegaConf.to_container(r.cfg.model, resolve=True)

        def build_replica() -> Sequential:
            return build_model(spec, seed=r.cfg.seed, dtype=r.dtype).to(r.xp, mp.flat.dtype).train()

        pool = WorkerPool(mp, build_replica, workers)
        return None, OrderedChainReducer(flat, comm, p.deterministic_chunks, pool, mp, r.model)
    if comm.size == 1:
        return None, None
    return GradientReducer(flat, comm, r.model, bucket_bytes=int(p.bucket_mb * 2**20), overlap=overlap), None


def _compute_gradients(r: Run, batch: Batch, worker: ComputeWorker, reducer: GradientReducer | None,
                       timer: PhaseTimer) -> tuple[float, int, int]:
    """Forward and backward of this rank's share of the global batch, leaving the gradient
    averaged over all ranks in the (master) flat buffer. Returns (loss sum, correct, count)
    of the local samples."""
    stats = worker.forward_backward(batch.x, batch.y, r.step, batch.sample_ids, timer, sync_master=True)
    with timer.phase("comm"):
        if reducer is not None:
            timer.add_buckets(reducer.finish().buckets)
    return stats


def _publish_timeline(r: Run, timer: PhaseTimer, trace: ChromeTrace, tb: TBLogger) -> None:
    """Append this rank's steps since the last call to its trace; rank 0 writes every rank's
    phase times and the step-time skew to TensorBoard. Collective: every rank calls it."""
    records = timer.take_records()
    trace.write(records)
    per_rank = r.comm.allgather_object([rec.brief() for rec in records])
    if r.is_main:
        for step, values in timeline_scalars(per_rank).items():
            tb.log_scalars(values, step)


def _progress(r: Run, loader: DataLoader, epoch: int, steps_per_epoch: int):
    if not (r.is_main and r.cfg.trainer.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=steps_per_epoch, initial=max(0, r.step - epoch * steps_per_epoch),
                desc=f"epoch {epoch + 1}/{r.cfg.trainer.epochs}", unit="step", dynamic_ncols=True, leave=True)


# -- evaluation and prediction ------------------------------------------------------------
def evaluate(r: Run, ds: Dataset) -> dict[str, float]:
    """Loss and accuracy on ``ds``, sharded over ranks and reduced as exact counts."""
    comm, xp, model = r.comm, r.xp, r.model
    model.eval()
    loss_fn = SoftmaxCrossEntropy()
    idx = shard_indices(len(ds.labels), comm.rank, comm.size)
    totals = np.zeros(3, dtype=np.float64)  # loss sum, correct, count
    for x, y in _batches(r, ds, idx):
        logits = model.forward(x)
        n = int(y.shape[0])
        totals[0] += float(loss_fn.forward(logits, y)) * n
        totals[1:] += accuracy_counts(logits, y)
    totals = _allreduce_host(comm, totals)
    count = max(totals[2], 1.0)
    return {"loss": totals[0] / count, "accuracy": totals[1] / count, "samples": int(totals[2])}


def predict(r: Run, ds: Dataset, out_path: Path) -> dict[str, Any]:
    """Write ``ImageId,Label`` (1-based ids, Kaggle's submission format) for ``ds``."""
    comm, model = r.comm, r.model
    model.eval()
    idx = shard_indices(len(ds.images), comm.rank, comm.size)
    preds = [to_host(model.forward(x).argmax(axis=1)) for x, _ in _batches(r, ds, idx)]
    mine = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    parts = comm.allgather_object(mine)
    labels = np.concatenate(parts)
    if r.is_main:
        with open(out_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "Label"])
            w.writerows((i + 1, int(p)) for i, p in enumerate(labels))
        log.info("wrote %d predictions to %s", len(labels), out_path)
    return {"predictions": str(out_path), "count": int(len(labels))}


def _batches(r: Run, ds: Dataset, idx: np.ndarray):
    from dtrain.data.loader import normalize

    bs = r.cfg.trainer.eval_batch_size
    for start in range(0, len(idx), bs):
        sel = idx[start:start + bs]
        x = r.xp.asarray(normalize(ds, ds.images[sel], r.dtype))
        y = r.xp.asarray(ds.labels[sel]) if ds.labels is not None else None
        yield x, y


def _allreduce_host(comm: Communicator, values: np.ndarray) -> np.ndarray:
    parts = comm.allgather_object(values)
    return np.sum(parts, axis=0)


# -- checkpoints ------------------------------------------------------------------------
def _save(r: Run, ckpts: CheckpointManager, optimizer, mp: FullPrecision) -> str | None:
    if not r.is_main:
        return None
    path = ckpts.save(r.step, r.model, optimizer, epoch=r.epoch,
                      rng_state={"seed": r.cfg.seed, "epoch": r.epoch, "step": r.step},
                      config=OmegaConf.to_yaml(r.cfg), extra=mp.state_dict())
    return str(path)


def _maybe_resume(r: Run, optimizer, mp: FullPrecision) -> None:
    resume = r.cfg.trainer.resume
    if not resume:
        return
    path = _resolve_checkpoint(r, resume)
    if path is None:
        if r.is_main:
            log.info("trainer.resume=auto: no earlier checkpoint found; starting fresh")
        return
    ckpt = load_checkpoint(path)
    ckpt.restore(r.model, optimizer)
    mp.load_state_dict(ckpt.extra)  # the loss scaler's state
    r.step, r.epoch = ckpt.step, ckpt.epoch
    if r.is_main:
        log.info("resumed from %s at epoch %d, step %d", path, r.epoch, r.step)


def _resolve_checkpoint(r: Run, value: str) -> Path | None:
    if value == "auto":
        return find_latest_run_checkpoint(_runs_roots(r.run_dir), exclude=r.run_dir)
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a ckpt-*.npz path or 'auto'")
    return path


def _runs_roots(run_dir: Path) -> list[Path]:
    # Hydra run dirs are <root>/<date>/<time> (sweeps: <root>/<date>/<time>/<job>); search
    # this run's root and the default outputs/ and multirun/ of the working directory.
    depth = 2 if (run_dir / ".." / "multirun.yaml").exists() else 1
    return [run_dir.resolve().parents[depth], Path("outputs"), Path("multirun")]


def _load_for_inference(r: Run) -> None:
    value = r.cfg.trainer.checkpoint or "auto"
    path = _resolve_checkpoint(r, value)
    if path is None:
        raise FileNotFoundError(
            "no checkpoint to evaluate: pass trainer.checkpoint=<path to ckpt-*.npz> or train first"
        )
    load_checkpoint(path).restore(r.model)
    if r.is_main:
        log.info("loaded %s", path)


# -- summary ----------------------------------------------------------------------------
def _summary(r: Run, images: int, seconds: float, checkpoint: str | None, timer: PhaseTimer,
             mp: FullPrecision) -> dict[str, Any]:
    last = r.history[-1] if r.history else {}
    images_per_sec = images / seconds if seconds > 0 else 0.0
    forward_flops = r.model.flops(tuple(r.cfg.model.input_shape))
    return {
        "model": r.cfg.model.name,
        "data": r.train_set.name if r.train_set is not None else None,
        "ranks": r.comm.size,
        "device": resolve_device(r.cfg.device),
        "steps": r.step,
        "epochs": r.epoch,
        "test_accuracy": last.get("test_accuracy"),
        "test_loss": last.get("test_loss"),
        "train_loss": last.get("train_loss"),
        "images_per_sec": images_per_sec,
        "train_seconds": seconds,
        # A training step costs about 3 forward passes (backward: input and weight gradients).
        "achieved_gflops_per_sec": images_per_sec * 3 * forward_flops / 1e9,
        "forward_gflop_per_image": forward_flops / 1e9,
        "phase_breakdown": timer.breakdown(),
        "peak_host_rss_bytes": peak_host_rss_bytes(),
        "peak_device_bytes": timer.peak_device_bytes,
        "checkpoint": checkpoint,
        "precision": {**mp.summary(), "tf32": r.precision.tf32},
        "history": r.history,
    }


def _precision_line(p: dict[str, Any]) -> str:
    if p["compute"] != "float16":
        return p["compute"] + (" (TF32 GEMMs)" if p["tf32"] else "")
    return (f"float16 compute / float32 master, final loss scale {p['final_loss_scale']:g}, "
            f"{p['skipped_steps']} overflow steps skipped")


def _performance_line(summary: dict[str, Any]) -> str:
    device = summary["peak_device_bytes"]
    return (f"{format_breakdown(summary['phase_breakdown'])} | {summary['achieved_gflops_per_sec']:.2f} GFLOP/s "
            f"(3 x forward FLOPs x images/s) | peak host RSS {summary['peak_host_rss_bytes'] / 2**20:.0f} MiB, "
            f"device pool {'n/a' if device is None else f'{device / 2**20:.0f} MiB'}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
