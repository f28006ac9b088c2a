"""``python -m dtrain``: the Hydra app. ``mpirun -n N python -m dtrain`` runs N ranks.

Under MPI, rank 0 chooses the run directory and broadcasts it before Hydra starts, so
every rank writes (or, for ranks > 0, reads) the same directory even when the ranks
start in different seconds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dtrain.dist.rundir import agree_run_dir

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from dtrain.train import run

    run(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    sys.argv = [sys.argv[0], *agree_run_dir(sys.argv[1:])]
    _app()


if __name__ == "__main__":
    main()
