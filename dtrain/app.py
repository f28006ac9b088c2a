"""``python -m dtrain``: the Hydra app. Start-up, mode dispatch, and how a run fails.

Under MPI the ranks first agree on one run directory (:mod:`dtrain.rundir`); Hydra then
composes the config from the shipped YAML files (:func:`dtrain.config.config_dir`, plus
any ``--config-dir`` of the user's) and the overrides, and :func:`run` executes
``trainer.mode``. The config is checked against the schema before anything else
happens. A run that fails prints one line naming the problem; the traceback goes to the
run's log file (``HYDRA_FULL_ERROR=1`` shows it on the terminal instead), and the run
directory gets a ``summary.json`` that says the run failed and why. On several ranks an
error on any rank ends every rank (:func:`dtrain.comm.watchdog.install_abort_on_exception`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from contextlib import ExitStack
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dtrain.allocator import keep_freed_memory
from dtrain.backend import resolve_device
from dtrain.checkpoint import load_checkpoint
from dtrain.comm import make_communicator
from dtrain.comm.env import rank_from_env
from dtrain.comm.watchdog import install_abort_on_exception
from dtrain.config import RunConfig, config_dir, validate
from dtrain.context import RunContext, build_context
from dtrain.evaluate import evaluate, predict
from dtrain.export import export_model
from dtrain.parallel.row_partition import RowPartitioner, partition_devices
from dtrain.precision import enable_tf32
from dtrain.preemption import PREEMPTED, Preempted
from dtrain.rundir import agree_run_dir, resolve_checkpoint
from dtrain.threads import set_blas_threads, thread_budget
from dtrain.train import train

log = logging.getLogger("dtrain")


def main() -> None:
    """The ``dtrain`` command and ``python -m dtrain``."""
    sys.argv = [sys.argv[0], *agree_run_dir(sys.argv[1:])]
    _hydra_main()


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(validate(cfg), run_dir)
    except Preempted as stopped:
        _stop(stopped, run_dir)
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail(err, run_dir)


def run(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Execute ``cfg.trainer.mode`` (train, eval or predict) in ``run_dir``; returns the
    summary (train) or the metrics / prediction file (eval / predict)."""
    device = resolve_device(cfg.device)
    if cfg.precision.tf32 and device != "gpu":
        raise ValueError("precision.tf32=true needs a GPU (TF32 is a tensor-core mode); device=auto found none")
    comm = make_communicator(cfg.parallel.backend, device, timeout_s=cfg.parallel.timeout_s,
                             devices_per_rank=cfg.parallel.devices_per_rank,
                             mpi_piece_bytes=int(cfg.parallel.mpi_piece_mb * 2**20))
    install_abort_on_exception(comm)
    if comm.size > 1:  # each rank's latest collective, for the report of one that does not finish
        comm.watchdog.post_arrivals_to(run_dir / ".collectives")
    threads = thread_budget(cfg.threads, comm.size)
    set_blas_threads(threads)
    if not keep_freed_memory():
        log.info("malloc thresholds unchanged (not glibc): large arrays are mapped afresh every step")
    if cfg.precision.tf32:
        enable_tf32()
    devices = partition_devices(cfg.parallel.row_partition.devices, cfg.parallel.devices_per_rank, device,
                                comm.local_rank, comm.local_size)
    with ExitStack() as scope:
        if len(devices) > 1:
            scope.enter_context(RowPartitioner(devices))
            if comm.rank == 0:
                log.info("row partitioning every Conv2d/Linear GEMM across devices %s on each rank", devices)
        try:
            return _run_mode(build_context(cfg, run_dir, comm, device, threads))
        except Preempted:
            raise  # every rank stops at the same step: a clean exit, not a failure
        except Exception as err:
            if comm.size > 1:  # the other ranks would wait for this one forever: end them all
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    sys.excepthook(*sys.exc_info())  # the traceback on the terminal, then the abort
                _fail(err, run_dir, comm.rank, abort=comm.abort)
            raise


def _run_mode(ctx: RunContext) -> dict[str, Any]:
    t = ctx.cfg.trainer
    if t.mode == "train":
        return train(ctx)
    choice = resolve_checkpoint(t.checkpoint or "auto", ctx.run_dir, ctx.cfg)
    if choice.path is None:
        raise FileNotFoundError(f"no checkpoint to {t.mode} with: {choice.reason}; pass "
                                "trainer.checkpoint=<path to ckpt-*.npz> or train this model on this data first")
    ckpt = load_checkpoint(choice.path)
    ckpt.restore(ctx.model)
    if ctx.is_main:
        log.info("loaded %s (%s)", choice.path, choice.reason)
    if t.mode == "export":
        return _export(ctx, ckpt.extra.get("input"), str(choice.path))
    ds = ctx.split(t.split, purpose=t.mode)
    if t.mode == "predict":
        return predict(ctx, ds, ctx.run_dir / t.predictions)
    metrics = evaluate(ctx, ds)
    if ctx.is_main:
        log.info("eval on %s: loss %.4f, accuracy %.4f", t.split, metrics["loss"], metrics["accuracy"])
        (ctx.run_dir / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _export(ctx: RunContext, normalization: dict[str, float] | None, source: str) -> dict[str, Any]:
    """``trainer.mode=export``: the model and its card into ``<run dir>/export`` (rank 0)."""
    if normalization is None:  # a checkpoint from before dtrain stored it: the data's own
        ds = ctx.train_set or ctx.test_set
        normalization = {"mean": ds.mean, "std": ds.std}
        if ctx.is_main:
            log.info("the checkpoint does not record its input normalization; using data %s's (mean %g, std %g)",
                     ds.name, ds.mean, ds.std)
    files = []
    if ctx.is_main:
        files = export_model(ctx.model, ctx.model_spec, normalization, ctx.run_dir / "export",
                             ctx.cfg.trainer.export_format, source)
        log.info("exported %s", ", ".join(map(str, files)))
    return {"files": [str(f) for f in files]}


def _stop(stopped: Preempted, run_dir: Path) -> None:
    """A run stopped on request: one line, ``summary.json`` saying so, exit status PREEMPTED."""
    if rank_from_env() == 0:
        log.warning("%s", stopped)
        print(f"dtrain: {stopped}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            (run_dir / "summary.json").write_text(json.dumps(
                {"status": "preempted", "signal": stopped.signal_name, "step": stopped.step,
                 "checkpoint": stopped.checkpoint}, indent=2) + "\n")
    sys.exit(PREEMPTED)


def _fail(err: Exception, run_dir: Path, rank: int | None = None, abort: Callable[[int], Any] | None = None) -> None:
    """One line on the terminal, the traceback in the run's log file (ranks > 0, which
    have none: ``dtrain-rank<R>.log`` beside it), ``summary.json`` marking the run failed;
    exit status 1, through ``abort`` (MPI_Abort: every rank ends) when given. Without a
    ``rank`` (an error before the communicator exists, the same on every rank) only the
    launcher's rank 0 speaks."""
    message = f"{type(err).__name__}: {err}" if not str(err) else str(err)
    logging.raiseExceptions = False  # on a full disk the log file cannot take it either: stay quiet
    details = traceback.format_exc()
    logs = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    record = logging.LogRecord("dtrain", logging.ERROR, __file__, 0, "run failed:\n%s", (details,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    if not logs and rank:
        with contextlib.suppress(OSError):
            path = run_dir / f"dtrain-rank{rank}.log"
            with open(path, "a") as f:
                f.write(f"rank {rank} failed:\n{details}")
            logs = [str(path)]
    where = f" (traceback in {logs[0]})" if logs else ""
    speaking_rank = rank_from_env() if rank is None else rank
    prefix = f"[rank {rank}] " if rank is not None else ""
    if rank is not None or speaking_rank == 0:
        print(f"{prefix}dtrain: error: {message.splitlines()[0]}{where}", file=sys.stderr, flush=True)
    if speaking_rank == 0:
        with contextlib.suppress(OSError):
            (run_dir / "summary.json").write_text(json.dumps({"status": "failed", "error": message}, indent=2) + "\n")
    if abort is not None:
        abort(1)
    sys.exit(1)
