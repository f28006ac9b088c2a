"""The training loop: set up, then epochs of steps, then the summary. Read it top to bottom.

:func:`train` gets a :class:`~dtrain.context.RunContext` from the app (:mod:`dtrain.app`):
the checked config, the communicator, the model and the data. One process per rank runs
it; with a world of one it is plain single-process training. Everything a step does is
in the loop; the helpers below it build things and write things down.
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from dtrain.checkpoint import CheckpointManager, load_checkpoint
from dtrain.context import RunContext
from dtrain.data import DataLoader, Dataset
from dtrain.evaluate import evaluate
from dtrain.nn import gemm
from dtrain.nn.flat import FlatParameters
from dtrain.nn.module import Sequential
from dtrain.optim import LRSchedule, Optimizer, build_optimizer
from dtrain.parallel.gradients import (
    AllReduceGradients,
    GradientAveraging,
    OverlappedAllReduceGradients,
)
from dtrain.parallel.ordered import OrderedChainGradients, chunk_range
from dtrain.parallel.sync import broadcast_parameters, check_consistency
from dtrain.parallel.workers import ComputeWorker, WorkerPool
from dtrain.precision import PrecisionPolicy, make_precision
from dtrain.preemption import Preempted, StopRequest
from dtrain.rundir import read_restarts, resolve_checkpoint
from dtrain.tensorboard import TBLogger
from dtrain.timeline import (
    ChromeTrace,
    PhaseTimer,
    format_breakdown,
    peak_host_rss_bytes,
    timeline_scalars,
)

log = logging.getLogger("dtrain")


class NonFiniteLossError(RuntimeError):
    """The loss or the averaged gradient became NaN/Inf."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a lost mount, ...)."""


def train(ctx: RunContext) -> dict[str, Any]:
    """Train ``ctx.model`` on ``ctx.train_set`` as ``ctx.cfg`` says; returns the summary
    (also written to ``summary.json`` by rank 0)."""
    cfg, comm, model = ctx.cfg, ctx.comm, ctx.model
    t = cfg.trainer

    # -- set-up ------------------------------------------------------------------------
    flat = FlatParameters(model)
    optimizer = _optimizer(ctx, flat)
    loader = _train_loader(ctx, ctx.split("train"))
    steps_per_epoch = len(loader)
    total_steps = min(steps_per_epoch * t.epochs, t.max_steps or math.inf)
    schedule = LRSchedule(base_lr=cfg.optim.lr, total_steps=total_steps, **cfg.optim.schedule.model_dump())
    precision = make_precision(cfg.precision, model, flat, ctx.model_spec, cfg.seed)
    checkpoints = CheckpointManager(ctx.run_dir / "checkpoints", keep_last=t.keep_last)
    last_good = _resume(ctx, optimizer, precision)
    broadcast_parameters(comm, model)
    gradients = _gradient_averaging(ctx, flat, precision)
    timer = PhaseTimer(ctx.xp, record_steps=cfg.logging.timeline)
    report = TrainingReport(ctx, flat, steps_per_epoch)
    report.start(precision)
    stop = StopRequest(ctx.run_dir)  # SIGTERM, SIGUSR1, Ctrl-C: finish the step, checkpoint, exit PREEMPTED
    stop.install()
    comm.barrier()  # start the first step together, so its communication wait is not start-up skew

    # -- the loop ------------------------------------------------------------------------
    model.train()
    images, seconds = 0, 0.0
    # The step count alone says where a (resumed) run stands: which epoch, which batch.
    for epoch in range(ctx.step // steps_per_epoch, t.epochs):
        if ctx.step >= total_steps:
            break
        loader.set_epoch(epoch, start_batch=ctx.step - epoch * steps_per_epoch)
        report.start_epoch(epoch)
        for host_batch in timer.timed(loader.host_batches(), "data"):
            with timer.phase("h2d"):
                batch = loader.to_device(host_batch)
            optimizer.lr = lr = schedule.lr_at(ctx.step)
            comm.watchdog.step = ctx.step  # a stuck collective's report names the step
            loss_sum, correct, count = gradients.compute(batch, ctx.step, timer)
            update = _gradient_is_usable(ctx, flat, precision, loss_sum / max(count, 1), last_good)
            if update:
                with timer.phase("optimizer"):
                    optimizer.step()
            step_seconds = timer.end_step(ctx.step)  # waits for the step's device work
            ctx.step += 1
            if update:
                images, seconds = images + t.batch_size, seconds + step_seconds
                report.step(loss_sum, correct, count, lr, step_seconds, timer)
            report.histograms()
            if cfg.parallel.check_interval and comm.size > 1 and ctx.step % cfg.parallel.check_interval == 0:
                check_consistency(comm, flat, ctx.step)
            saved = t.checkpoint_every and ctx.step % t.checkpoint_every == 0
            if saved:
                last_good = _save(ctx, checkpoints, optimizer, precision, last_good)
            if ctx.step >= total_steps:
                break
            signal_name = stop.agreed(comm)
            if signal_name is not None:
                if not saved:
                    last_good = _save(ctx, checkpoints, optimizer, precision, last_good)
                gradients.close()
                raise Preempted(signal_name, ctx.step, last_good)
        metrics = evaluate(ctx, ctx.test_set) if ctx.test_set is not None and ctx.test_set.labels is not None else {}
        model.train()
        ctx.epoch = ctx.step // steps_per_epoch
        report.end_epoch(epoch, metrics)

    # -- the end -------------------------------------------------------------------------
    stop.uninstall()
    gradients.close()
    report.timeline(timer, final=True)
    last_good = _save(ctx, checkpoints, optimizer, precision, last_good)
    summary = _summary(ctx, images, seconds, last_good, timer, precision, report.history)
    report.finish(summary)
    return summary


# -- set-up -----------------------------------------------------------------------------
def _optimizer(ctx: RunContext, flat: FlatParameters) -> Optimizer:
    options = ctx.cfg.optim.model_dump(exclude={"name", "schedule"})
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    return build_optimizer(ctx.cfg.optim.name, flat, **options)


def _train_loader(ctx: RunContext, train_set: Dataset) -> DataLoader:
    """This rank's share of every global batch: an equal slice, or in deterministic mode
    its run of whole micro-batches."""
    cfg, comm = ctx.cfg, ctx.comm
    batch, share = cfg.trainer.batch_size, None
    if cfg.parallel.deterministic:
        first, stop = chunk_range(cfg.parallel.deterministic_chunks, comm.rank, comm.size)
        micro = batch // cfg.parallel.deterministic_chunks
        share = (first * micro, stop * micro)
    elif batch % comm.size:
        raise ValueError(f"trainer.batch_size={batch} (the global batch) must be divisible by the number of "
                         f"ranks ({comm.size})")
    if len(train_set) < batch:
        raise ValueError(f"the training set ({len(train_set)} samples) is smaller than one global batch "
                         f"(trainer.batch_size={batch})")
    # Batches are prepared ahead in a thread on GPU only: on CPU that thread takes a core
    # from the BLAS threads, which wait for each other at every GEMM.
    prefetch = cfg.data.prefetch if cfg.data.prefetch is not None else (2 if ctx.device == "gpu" else 0)
    return DataLoader(train_set, global_batch=batch, rank=comm.rank, world_size=comm.size, seed=cfg.seed,
                      shuffle=True, drop_last=True, augment=cfg.data.augment, xp=ctx.xp, dtype=ctx.dtype,
                      prefetch=prefetch, share=share)


def _gradient_averaging(ctx: RunContext, flat: FlatParameters, precision: PrecisionPolicy) -> GradientAveraging:
    """The data-parallel strategy, chosen once: the ordered chain (deterministic mode), or
    bucketed all-reduces started during backward (overlap) or after it."""
    p, comm = ctx.cfg.parallel, ctx.comm
    if p.deterministic:
        first, stop = chunk_range(p.deterministic_chunks, comm.rank, comm.size)
        # One micro-batch per core at a time; on a GPU, or with GEMMs split over row
        # partitions (which bring their own threads), one at a time.
        workers = 1 if ctx.device == "gpu" or gemm.partitioned() else min(ctx.threads, stop - first)

        def build_replica() -> Sequential:
            return ctx.build_model().to(ctx.xp, precision.flat.dtype).train()

        pool = WorkerPool(precision, build_replica, workers)
        return OrderedChainGradients(flat, comm, p.deterministic_chunks, pool, precision, ctx.model)
    worker = ComputeWorker(precision.model, precision.flat, precision)
    bucket_bytes = max(1, int(p.bucket_mb * 2**20))
    # auto: overlap with NCCL, whose reductions run on a side stream while the GPU computes.
    # MPI reduces host buffers on the CPU cores that run the backward pass (Open MPI
    # progresses it inside MPI_Test calls on the training thread), so it only competes.
    overlap = comm.name == "nccl" if p.overlap == "auto" else p.overlap
    if overlap and precision.mixed:
        # float16 gradients reach the float32 master buffer only after the whole backward pass.
        if ctx.is_main and comm.size > 1:
            log.info("precision.compute=float16: gradient all-reduce without overlap (parallel.overlap ignored)")
        overlap = False
    if not overlap or comm.size == 1:
        return AllReduceGradients(worker, flat, comm, bucket_bytes)
    averaging = OverlappedAllReduceGradients(worker, flat, comm, bucket_bytes)
    precision.model.register_backward_hook(averaging.layer_done)
    return averaging


def _resume(ctx: RunContext, optimizer: Optimizer, precision: PrecisionPolicy) -> str | None:
    """Continue from ``trainer.resume`` (a checkpoint path or ``auto``, see
    :func:`dtrain.rundir.resolve_checkpoint`); returns the checkpoint resumed from, the last
    good one until the next save. A checkpoint whose data order differs from this run's
    (another seed, batch size or training set) is refused: the resumed run would not
    continue where the checkpoint stopped."""
    if not ctx.cfg.trainer.resume:
        return None
    choice = resolve_checkpoint(ctx.cfg.trainer.resume, ctx.run_dir, ctx.cfg)
    if choice.path is None:
        if ctx.is_main:
            log.info("trainer.resume=auto: %s; starting fresh", choice.reason)
        return None
    ckpt = load_checkpoint(choice.path)
    for key, here in _data_order(ctx).items():
        there = ckpt.rng_state.get(key, here)
        if there != here:
            raise ValueError(f"{choice.path} was trained with {key}={there}; resuming with {key}={here} would not "
                             f"continue its data order and dropout masks: resume with {key}={there}, or start fresh")
    ckpt.restore(ctx.model, optimizer)
    precision.load_state_dict(ckpt.extra)  # the loss scaler's state
    ctx.step, ctx.epoch = ckpt.step, ckpt.epoch
    if ctx.is_main:
        stale = CheckpointManager(choice.path.parent, keep_last=1, clean=False).remove_stale_temp_files()
        log.info("resumed from %s (%s) at epoch %d, step %d%s", choice.path, choice.reason, ctx.epoch, ctx.step,
                 f"; removed {len(stale)} temporary file(s) of interrupted saves there" if stale else "")
    return str(choice.path)


def _normalization(ctx: RunContext) -> dict[str, float]:
    """How the model's input was normalized: ``x = (pixel / 255 - mean) / std``."""
    ds = ctx.split("train")
    return {"mean": float(ds.mean), "std": float(ds.std)}


def _data_order(ctx: RunContext) -> dict[str, int]:
    """What fixes the sequence of batches and dropout masks, besides the step: stored in
    every checkpoint and checked on resume."""
    return {"seed": ctx.cfg.seed, "trainer.batch_size": ctx.cfg.trainer.batch_size,
            "training samples": len(ctx.split("train"))}


# -- in the loop ----------------------------------------------------------------------------
def _gradient_is_usable(ctx: RunContext, flat: FlatParameters, precision: PrecisionPolicy, loss: float,
                        last_good: str | None) -> bool:
    """Whether the optimizer may apply this step's gradient. A non-finite gradient is a
    float16 overflow that dynamic loss scaling absorbs (skipped), a skipped step with
    ``trainer.on_nonfinite=skip``, or the end of the run. Checked on the averaged
    gradient, which every rank holds identically, so all ranks decide alike."""
    finite = bool(ctx.xp.isfinite(flat.grads).all())
    if precision.overflowed(finite):
        if ctx.is_main:
            log.debug("step %d: float16 gradient overflow; step skipped, loss scale now %g",
                      ctx.step, precision.loss_scale)
        return False
    if finite:
        return True
    if ctx.cfg.trainer.on_nonfinite == "skip":
        if ctx.is_main:
            log.warning("step %d: non-finite gradient; step skipped", ctx.step)
        return False
    raise NonFiniteLossError(
        f"step {ctx.step}: the loss or gradient became non-finite (local loss={loss}); the last good checkpoint "
        f"is {last_good or 'none yet'}. Lower optim.lr or set trainer.on_nonfinite=skip"
    )


def _save(ctx: RunContext, checkpoints: CheckpointManager, optimizer: Optimizer, precision: PrecisionPolicy,
          last_good: str | None) -> str | None:
    """Rank 0 writes a checkpoint of the current step; returns its path (None elsewhere).
    A failed write leaves the earlier checkpoints as they were and ends the run with one
    line naming the file, the reason and the last good checkpoint."""
    if not ctx.is_main:
        return None
    try:
        path = checkpoints.save(ctx.step, ctx.model, optimizer, epoch=ctx.epoch,
                                rng_state={**_data_order(ctx), "epoch": ctx.epoch, "step": ctx.step},
                                config=ctx.cfg.model_dump(mode="json"),
                                extra={**precision.state_dict(), "input": _normalization(ctx)})
    except OSError as err:
        reason = (err.strerror or str(err)).lower()
        raise CheckpointWriteError(f"cannot write checkpoint {checkpoints.path_for(ctx.step)}: {reason}; last good "
                                   f"checkpoint: {last_good or 'none yet'}") from err
    return str(path)


# -- what a run writes down ---------------------------------------------------------------
class TrainingReport:
    """Progress bars, log lines, TensorBoard scalars, histograms and images, the timeline
    (TensorBoard and a Chrome trace per rank) and ``summary.json``. Rank 0 writes all of
    it but the trace, which every rank writes for itself."""

    def __init__(self, ctx: RunContext, flat: FlatParameters, steps_per_epoch: int) -> None:
        cfg = ctx.cfg
        self.ctx, self.flat, self.steps_per_epoch = ctx, flat, steps_per_epoch
        self.tb = TBLogger(ctx.run_dir / "tensorboard", enabled=ctx.is_main and cfg.logging.tensorboard,
                           hist_interval=cfg.logging.hist_interval)
        self.trace = (ChromeTrace(ctx.run_dir / f"timeline-rank{ctx.comm.rank}.json", ctx.comm.rank, ctx.comm.size)
                      if cfg.logging.timeline else None)
        self.history: list[dict[str, Any]] = []
        self._bar: Any = None
        self._epoch_start = 0.0
        self._loss = self._correct = self._count = 0.0

    def start(self, precision: PrecisionPolicy) -> None:
        ctx = self.ctx
        if ctx.is_main:
            log.info("model %s: %d parameters, %.3f GFLOP/image forward; %d ranks on %s; %d steps/epoch; "
                     "precision %s%s", ctx.cfg.model.name, ctx.model.num_parameters(),
                     ctx.model.flops(ctx.cfg.model.input_shape) / 1e9, ctx.comm.size, ctx.device,
                     self.steps_per_epoch, precision.describe(), ", TF32 GEMMs" if ctx.cfg.precision.tf32 else "")

    def start_epoch(self, epoch: int) -> None:
        ctx = self.ctx
        self._epoch_start = time.perf_counter()
        self._loss = self._correct = self._count = 0.0
        if ctx.is_main and ctx.cfg.trainer.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=self.steps_per_epoch, initial=max(0, ctx.step - epoch * self.steps_per_epoch),
                             desc=f"epoch {epoch + 1}/{ctx.cfg.trainer.epochs}", unit="step", dynamic_ncols=True)

    def step(self, loss_sum: float, correct: int, count: int, lr: float, seconds: float, timer: PhaseTimer) -> None:
        """After an applied update (``ctx.step`` already counts it)."""
        ctx, batch = self.ctx, self.ctx.cfg.trainer.batch_size
        self._loss, self._correct, self._count = self._loss + loss_sum, self._correct + correct, self._count + count
        loss, accuracy = loss_sum / max(count, 1), correct / max(count, 1)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", img_s=f"{batch / seconds:.0f}",
                                  lr=f"{lr:.4g}")
            self._bar.update(1)
        if ctx.step % ctx.cfg.logging.log_interval == 0:
            self.tb.log_scalars({"train/loss": loss, "train/accuracy": accuracy, "train/lr": lr,
                                 "train/images_per_sec": batch / seconds}, ctx.step)
            self.timeline(timer)

    def histograms(self) -> None:
        """Every ``logging.hist_interval`` steps (and at the end of every epoch)."""
        self.tb.log_histograms(self.flat, self.ctx.step)

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        ctx = self.ctx
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        stats = {"epoch": epoch, "step": ctx.step, "train_loss": self._loss / max(self._count, 1),
                 "train_accuracy": self._correct / max(self._count, 1),
                 "epoch_seconds": time.perf_counter() - self._epoch_start}
        stats.update({f"test_{k}": v for k, v in metrics.items()})
        self.history.append(stats)
        if ctx.is_main:
            self.tb.log_scalars({f"eval/{k}": v for k, v in metrics.items()}, ctx.step)
            if len(self.history) == 1 and ctx.cfg.logging.images:
                self.tb.log_images(ctx.split("train").images[:64], ctx.model, ctx.step)
            test = (f"test loss {metrics['loss']:.4f} acc {metrics['accuracy']:.4f}" if metrics
                    else "no labeled test data")
            log.info("epoch %d: train loss %.4f acc %.4f | %s", epoch, stats["train_loss"], stats["train_accuracy"],
                     test)
        self.tb.log_histograms(self.flat, ctx.step, every_step=True)  # at least once per epoch

    def timeline(self, timer: PhaseTimer, final: bool = False) -> None:
        """With ``logging.timeline``: this rank's steps since the last call into its trace;
        rank 0 writes every rank's phase times and the step-time skew to TensorBoard.
        Collective: every rank calls it at the same steps."""
        if self.trace is None:
            return
        records = timer.take_records()
        self.trace.write(records)
        per_rank = self.ctx.comm.allgather_object([rec.brief() for rec in records])
        if self.ctx.is_main:
            for step, values in timeline_scalars(per_rank).items():
                self.tb.log_scalars(values, step)
        if final:
            self.trace.close()

    def finish(self, summary: dict[str, Any]) -> None:
        ctx = self.ctx
        if ctx.is_main:
            r = summary["restarts"]
            if r["count"]:
                self.tb.log_scalars({"elastic/restarts": r["count"], "elastic/steps_redone": r["steps_redone"],
                                     "elastic/seconds_lost": r["seconds_lost"]}, ctx.step)
            self.tb.log_hparams(ctx.cfg.model_dump(mode="json"), summary)
            (ctx.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
            accuracy = summary["test_accuracy"]
            log.info("done: test accuracy %s, %.1f images/s, %d steps, checkpoint %s; precision %s",
                     "n/a" if accuracy is None else f"{accuracy:.4f}", summary["images_per_sec"], ctx.step,
                     summary["checkpoint"], _precision_line(summary["precision"]))
            log.info("performance (rank 0): %s", _performance_line(summary))
        self.tb.close()


def _summary(ctx: RunContext, images: int, seconds: float, checkpoint: str | None, timer: PhaseTimer,
             precision: PrecisionPolicy, history: list[dict[str, Any]]) -> dict[str, Any]:
    last = history[-1] if history else {}
    restarts = read_restarts(ctx.run_dir)  # written by the elastic launcher, if it restarted this run
    images_per_sec = images / seconds if seconds > 0 else 0.0
    forward_flops = ctx.model.flops(ctx.cfg.model.input_shape)
    return {
        "model": ctx.cfg.model.name,
        "data": ctx.train_set.name if ctx.train_set is not None else None,
        "ranks": ctx.comm.size,
        "device": ctx.device,
        "steps": ctx.step,
        "epochs": ctx.epoch,
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
        "precision": {**precision.summary(), "tf32": ctx.cfg.precision.tf32},
        "restarts": {"count": len(restarts),
                     "failed": sum(r["kind"] == "failed" for r in restarts),
                     "steps_redone": sum(r["steps_redone"] or 0 for r in restarts),
                     "seconds_lost": sum(r["seconds_lost"] or 0 for r in restarts),
                     "records": restarts},
        "history": history,
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

