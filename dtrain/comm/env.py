"""Was this process started by an MPI launcher? Answered from the environment alone, so a
plain ``python -m dtrain`` never imports (and initializes) MPI."""
from __future__ import annotations

import os

# Set for each process by Open MPI's mpirun (OMPI_*), MPICH/Intel MPI's hydra (PMI_*) and
# PMIx launchers such as ``srun --mpi=pmix`` (PMIX_RANK).
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_LAUNCHER_VARS = (*_SIZE_VARS, "PMIX_RANK")


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (even ``mpirun -n 1``)."""
    return any(var in os.environ for var in _LAUNCHER_VARS)


def world_size_from_env() -> int | None:
    """The number of processes the launcher started, or None when the environment does not say."""
    for var in _SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def rank_from_env() -> int:
    """This process's rank as the launcher set it (0 outside a launcher or when it does not say)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0
