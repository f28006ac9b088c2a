"""Run directories: one Hydra run directory for all ranks of an MPI job, and the earlier
runs whose checkpoints ``auto`` picks from.

Where runs go is defined once, by ``hydra.run.dir`` and ``hydra.sweep.dir`` in
``conf/config.yaml`` (:func:`dir_templates`).

Hydra names the run directory after the current time (``${now:...}``); ranks that start
in different seconds would each create their own. :func:`agree_run_dir` runs before
Hydra: rank 0 fixes the directory and broadcasts it, and every rank gets it as an
explicit ``hydra.run.dir`` override. Ranks > 0 also get overrides that keep them from
writing into it: no ``.hydra/`` config copy and no log file (their warnings and errors
still reach stderr through Python's last-resort logging handler).
"""
from __future__ import annotations

import datetime
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from dtrain.checkpoint import CheckpointError, CheckpointManager, read_config, run_checkpoints
from dtrain.comm.env import launched_by_mpi, world_size_from_env
from dtrain.config import RunConfig, config_dir, run_identity

QUIET_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none")

_NOW = re.compile(r"\$\{now:([^}]*)\}")


def _override_key(arg: str) -> str | None:
    """``hydra.run.dir`` for ``hydra.run.dir=x``, ``+hydra.run.dir=x`` or ``++hydra.run.dir=x``."""
    if "=" not in arg or arg.startswith("-"):
        return None
    return arg.split("=", 1)[0].lstrip("+~")


def _last_value(argv: list[str], key: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in argv if _override_key(arg) == key]
    return values[-1] if values else None


def resolve_now(template: str, now: datetime.datetime) -> str:
    """``template`` with every ``${now:FORMAT}`` replaced by ``now.strftime(FORMAT)``."""
    return _NOW.sub(lambda m: now.strftime(m.group(1)), template)


@functools.lru_cache(maxsize=1)
def dir_templates() -> dict[str, str]:
    """``hydra.run.dir`` and ``hydra.sweep.dir`` of ``conf/config.yaml``, ``${now:...}`` unresolved:
    the one definition of where runs go."""
    hydra = yaml.safe_load((config_dir() / "config.yaml").read_text())["hydra"]
    return {"hydra.run.dir": hydra["run"]["dir"], "hydra.sweep.dir": hydra["sweep"]["dir"]}


def run_roots(run_dir: Path) -> list[Path]:
    """Where earlier runs live: this run's root (``<root>/<date>/<time>``, sweeps one level
    deeper) and the default roots of single runs and sweeps, relative to the working directory."""
    depth = 2 if (run_dir / ".." / "multirun.yaml").exists() else 1
    defaults = [Path(template.split("${", 1)[0]) for template in dir_templates().values()]
    return [run_dir.resolve().parents[depth], *defaults]


def agree_run_dir(argv: list[str]) -> list[str]:
    """Hydra command-line overrides ``argv`` with the run directory agreed by all ranks.

    Outside MPI, or in a world of one, ``argv`` comes back unchanged. Otherwise rank 0
    takes the directory the user passed (``hydra.run.dir=...``, or ``hydra.sweep.dir``
    with ``-m``/``--multirun``), else the one in ``conf/config.yaml``, resolving any
    ``${now:...}`` in it; all ranks receive it. Collective: every rank must call it.
    """
    argv = list(argv)
    if not launched_by_mpi() or world_size_from_env() == 1:
        return argv
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return argv
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    chosen = None
    if comm.Get_rank() == 0:
        now = datetime.datetime.now()
        try:
            chosen = resolve_now(_last_value(argv, key) or dir_templates()[key], now)
        except Exception as err:  # the other ranks wait in the broadcast: hand them the error
            chosen = err
    chosen = comm.bcast(chosen, root=0)
    if isinstance(chosen, Exception):
        raise chosen

    replaced = {key}
    extra = [f"{key}={chosen}"]
    if comm.Get_rank() > 0:
        replaced.update(_override_key(arg) for arg in QUIET_OVERRIDES)
        extra.extend(QUIET_OVERRIDES)
    return [arg for arg in argv if _override_key(arg) not in replaced] + extra


@dataclass(frozen=True)
class CheckpointChoice:
    """What ``trainer.resume`` / ``trainer.checkpoint`` resolved to: ``path`` (None: nothing to
    load) and ``reason``, one phrase for the log."""

    path: Path | None
    reason: str


def resolve_checkpoint(value: str, run_dir: Path, cfg: RunConfig) -> CheckpointChoice:
    """A ``ckpt-*.npz`` path as given, or for ``auto``:

    1. this run directory's newest checkpoint (a run restarted in its own directory, e.g.
       by the elastic launcher, or a sweep re-run in the same sweep directory);
    2. else the newest checkpoint of an earlier run whose stored config has this run's
       model and data (:func:`dtrain.config.run_identity`), never one of a sibling job of
       the same sweep;
    3. else nothing.
    """
    if value != "auto":
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist; pass a ckpt-*.npz path or 'auto'")
        return CheckpointChoice(path, "given")
    own = run_checkpoints_in(run_dir)
    if own:
        return CheckpointChoice(own[-1], "this run directory's newest checkpoint")
    sweep = run_dir.resolve().parent if (run_dir / ".." / "multirun.yaml").exists() else None
    wanted, skipped = run_identity(cfg), 0
    for path in run_checkpoints(run_roots(run_dir), exclude=run_dir):
        if sweep is not None and path.resolve().is_relative_to(sweep):
            continue  # a sibling job of this sweep
        try:
            stored = read_config(path)
        except CheckpointError:
            skipped += 1
            continue
        if isinstance(stored, str):
            stored = yaml.safe_load(stored)
        if isinstance(stored, dict) and run_identity(stored) == wanted:
            run = path.parent.parent
            return CheckpointChoice(path, f"the newest checkpoint of an earlier run with this model and data ({run})")
        skipped += 1
    return CheckpointChoice(None, f"no earlier run has this model and data ({skipped} checkpoints of other runs "
                                  f"skipped: different model, dtype or data)" if skipped else "no earlier checkpoint")


def run_checkpoints_in(run_dir: Path) -> list[Path]:
    """The checkpoints of one run directory, oldest step first."""
    directory = run_dir / "checkpoints"
    return CheckpointManager(directory, keep_last=1, clean=False).checkpoints() if directory.is_dir() else []


RESTARTS_FILE = "restarts.json"  # the elastic launcher's record of a run's restarts


def read_restarts(run_dir: Path) -> list[dict]:
    """The restarts :mod:`dtrain.launch` recorded in ``run_dir`` (empty: none)."""
    path = run_dir / RESTARTS_FILE
    return json.loads(path.read_text()) if path.is_file() else []
