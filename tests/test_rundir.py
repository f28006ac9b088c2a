"""All ranks of an MPI job share one Hydra run directory, and only rank 0 writes into it."""
from __future__ import annotations

import datetime

import pytest
from mpirun_helper import assert_ok, run_mpi

from dtrain.rundir import agree_run_dir, resolve_now


def test_without_launcher_argv_is_unchanged(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    argv = ["optim.lr=0.1", "hydra.run.dir=x/${now:%H}"]
    assert agree_run_dir(argv) == argv


def test_resolve_now_replaces_every_now_interpolation():
    now = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)
    assert resolve_now("out/${now:%Y-%m-%d}/${now:%H-%M-%S-%f}/x", now) == "out/2024-05-06/07-08-09-123456/x"
    assert resolve_now("plain/dir", now) == "plain/dir"


@pytest.mark.mpi
def test_ranks_starting_at_different_times_share_one_run_dir(tmp_path):
    result = run_mpi("rundir_app.py", 3, timeout=60, cwd=tmp_path)
    assert_ok(result, 3)
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert f"RUN_DIR {run_dir}\n" in result.stdout
    assert len(run_dir.name) == len("HH-MM-SS-ffffff")
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert files == [".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "rundir_app.log"]
    log = (run_dir / "rundir_app.log").read_text()
    assert "hello from rank 0" in log and "hello from rank 1" not in log and "hello from rank 2" not in log
