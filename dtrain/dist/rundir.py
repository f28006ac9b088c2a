"""One Hydra run directory for all ranks of an MPI job.

Hydra names the run directory after the current time (``${now:...}``); ranks that start
in different seconds would each create their own. :func:`agree_run_dir` runs before
Hydra: rank 0 fixes the directory and broadcasts it, and every rank gets it as an
explicit ``hydra.run.dir`` override. Ranks > 0 also get overrides that keep them from
writing into it: no ``.hydra/`` config copy and no log file (their warnings and errors
still reach stderr through Python's last-resort logging handler).
"""
from __future__ import annotations

import datetime
import re

from dtrain.dist.env import launched_by_mpi, world_size_from_env

RUN_DIR_FORMAT = "outputs/%Y-%m-%d/%H-%M-%S-%f"
SWEEP_DIR_FORMAT = "multirun/%Y-%m-%d/%H-%M-%S-%f"
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


def agree_run_dir(argv: list[str], run_dir_format: str = RUN_DIR_FORMAT,
                  sweep_dir_format: str = SWEEP_DIR_FORMAT) -> list[str]:
    """Hydra command-line overrides ``argv`` with the run directory agreed by all ranks.

    Outside MPI, or in a world of one, ``argv`` comes back unchanged. Otherwise rank 0
    takes the directory the user passed (``hydra.run.dir=...``, or ``hydra.sweep.dir``
    with ``-m``/``--multirun``), resolving any ``${now:...}`` in it, or else
    ``now.strftime(run_dir_format)``; all ranks receive it. Collective: every rank must call it.
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
        user_value = _last_value(argv, key)
        chosen = resolve_now(user_value, now) if user_value else now.strftime(sweep_dir_format if multirun else run_dir_format)
    chosen = comm.bcast(chosen, root=0)

    replaced = {key}
    extra = [f"{key}={chosen}"]
    if comm.Get_rank() > 0:
        replaced.update(_override_key(arg) for arg in QUIET_OVERRIDES)
        extra.extend(QUIET_OVERRIDES)
    return [arg for arg in argv if _override_key(arg) not in replaced] + extra
