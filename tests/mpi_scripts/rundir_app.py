"""Ranks starting at different times agree on one Hydra run directory.

Rank 1 starts 1.5 s late. First ``agree_run_dir`` is called on a user template with
``${now:...}``; then a real Hydra app runs on ``agree_run_dir(sys.argv[1:])``: every rank
must see the same output directory, and only rank 0 may write files into it.
"""
from __future__ import annotations

import logging
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from mpi4py import MPI

from dtrain.rundir import agree_run_dir

world = MPI.COMM_WORLD
if world.rank == 1:
    time.sleep(1.5)

# a user template with ${now:...} resolves identically everywhere
argv = agree_run_dir(["lr=0.1", "hydra.run.dir=runs/${now:%H-%M-%S-%f}", "hydra/job_logging=default"])
run_dirs = world.allgather([a for a in argv if a.startswith("hydra.run.dir=")])
assert len(run_dirs[0]) == 1 and all(d == run_dirs[0] for d in run_dirs), run_dirs
assert run_dirs[0][0].startswith("hydra.run.dir=runs/") and "${now" not in run_dirs[0][0], run_dirs
if world.rank == 0:
    assert argv == ["lr=0.1", "hydra/job_logging=default", run_dirs[0][0]], argv
else:
    assert argv == ["lr=0.1", run_dirs[0][0], "hydra.output_subdir=null", "hydra/job_logging=none",
                    "hydra/hydra_logging=none"], argv

log = logging.getLogger("rundir_app")


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def app(cfg) -> None:
    out = HydraConfig.get().runtime.output_dir
    log.info("hello from rank %d", world.rank)
    dirs = world.allgather(out)
    assert len(set(dirs)) == 1, dirs
    if world.rank == 0:
        print(f"RUN_DIR {out}", flush=True)
    print(f"OK rank {world.rank}", flush=True)


sys.argv = [sys.argv[0], *agree_run_dir(sys.argv[1:])]
app()
