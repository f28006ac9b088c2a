"""What the benchmark scripts share: running ``python -m dtrain`` (under ``mpirun`` for several
ranks) in a scratch directory and reading the run's ``summary.json``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def mpirun() -> str:
    """``mpirun`` beside the running Python (the venv's Open MPI wheel) or on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.is_file() else shutil.which("mpirun")
    if found is None:
        sys.exit("mpirun not found: pip install 'dtrain[mpi]'")
    return found


def train_summary(overrides: list[str], out: Path, ranks: int = 1, verbose: bool = False) -> dict:
    """Run ``python -m dtrain overrides`` (``mpirun -n ranks`` when ranks > 1) in a new
    directory under ``out`` and return its ``summary.json``."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"r{ranks}-", dir=out))
    app = [sys.executable, "-m", "dtrain", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cmd = [mpirun(), "--oversubscribe", "--bind-to", "none", "-n", str(ranks), *app] if ranks > 1 else app
    subprocess.run(cmd, check=True, cwd=out, env=env, capture_output=not verbose)
    return json.loads((run_dir / "summary.json").read_text())


def median_run(summaries: list[dict]) -> dict:
    """The run with the median ``images_per_sec``."""
    return sorted(summaries, key=lambda s: s["images_per_sec"])[len(summaries) // 2]
