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
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dtrain.backend import resolve_device
from dtrain.checkpoint import load_checkpoint
from dtrain.comm import make_communicator
from dtrain.comm.env import rank_from_env
from dtrain.comm.watchdog import install_abort_on_exception
from dtrain.config import RunConfig, config_dir, validate
from dtrain.context import RunContext, build_context
from dtrain.evaluate import evaluate, predict
from dtrain.parallel.row_partition import RowPartitioner, partition_devices
from dtrain.precision import enable_tf32
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
        except BaseException:
            # Hydra catches exceptions before sys.excepthook sees them; on several ranks the
            # hook prints the error once and aborts every rank instead of leaving them hanging.
            if comm.size > 1:
                sys.excepthook(*sys.exc_info())
            raise


def _run_mode(ctx: RunContext) -> dict[str, Any]:
    t = ctx.cfg.trainer
    if t.mode == "train":
        return train(ctx)
    choice = resolve_checkpoint(t.checkpoint or "auto", ctx.run_dir, ctx.cfg)
    if choice.path is None:
        raise FileNotFoundError(f"no checkpoint to {t.mode} with: {choice.reason}; pass "
                                "trainer.checkpoint=<path to ckpt-*.npz> or train this model on this data first")
    load_checkpoint(choice.path).restore(ctx.model)
    if ctx.is_main:
        log.info("loaded %s (%s)", choice.path, choice.reason)
    ds = ctx.split(t.split)
    if t.mode == "predict":
        return predict(ctx, ds, ctx.run_dir / t.predictions)
    metrics = evaluate(ctx, ds)
    if ctx.is_main:
        log.info("eval on %s: loss %.4f, accuracy %.4f", t.split, metrics["loss"], metrics["accuracy"])
        (ctx.run_dir / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _fail(err: Exception, run_dir: Path) -> None:
    """One line on the terminal, the traceback in the run's log file, ``summary.json``
    marking the run failed; exit status 1."""
    message = f"{type(err).__name__}: {err}" if not str(err) else str(err)
    logging.raiseExceptions = False  # on a full disk the log file cannot take it either: stay quiet
    logs = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    record = logging.LogRecord("dtrain", logging.ERROR, __file__, 0, "run failed:\n%s", (traceback.format_exc(),),
                               None)
    for handler in logs:
        handler.handle(record)
    where = f" (traceback in {logs[0].baseFilename})" if logs else ""
    if rank_from_env() == 0:
        print(f"dtrain: error: {message.splitlines()[0]}{where}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            (run_dir / "summary.json").write_text(json.dumps({"status": "failed", "error": message}, indent=2) + "\n")
    sys.exit(1)
