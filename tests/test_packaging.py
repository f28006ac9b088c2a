"""A normal install runs: the wheel holds every module and every shipped config, and
``python -m dtrain`` from it works from any directory (no checkout next to it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What a checkout may hold besides the source: never copied into the build.
LOCAL = {".git", ".venv", "outputs", "multirun", "build", "dist", "data", "runs", ".pytest_cache", ".hypothesis"}


def _skip(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == REPO
    return {n for n in names if (top and n in LOCAL) or n == "__pycache__" or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project built as a wheel, from a copy of the source (the checkout stays clean)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=_skip)
    # Build with this environment's setuptools when it has one (no download), else isolated.
    isolation = ["--no-build-isolation"] if _has_build_backend() else []
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w",
                           str(root / "out"), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (root / "out").glob("dtrain-*.whl")
    return built


def _has_build_backend() -> bool:
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(REPO)) for p in (REPO / "dtrain").rglob("*.py")}
    configs = {f"dtrain/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert modules <= names, sorted(modules - names)
    assert configs <= names, sorted(configs - names)
    assert len(configs) >= 15  # root, 7 groups, 3 models, 5 data sets, 3 optimizers


def test_the_installed_app_runs_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The unpacked wheel comes first on the path, ahead of any checkout or editable install.
    env = {**os.environ, "PYTHONPATH": str(site), "HYDRA_FULL_ERROR": "1"}
    which = subprocess.run([sys.executable, "-c", "import dtrain.config as c; print(c.__file__, c.config_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert which.split() == [str(site / "dtrain" / "config.py"), str(site / "dtrain" / "conf")]
    help_text = subprocess.run([sys.executable, "-m", "dtrain", "--help"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "model: alexnet, lenet, simple_cnn" in help_text.stdout, help_text.stderr
    run = subprocess.run([sys.executable, "-m", "dtrain", "model=lenet", "data=synthetic", "data.train_size=64",
                          "data.test_size=32", "trainer.batch_size=32", "trainer.max_steps=2", "device=cpu",
                          "trainer.progress=false", "logging.tensorboard=false"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert list(elsewhere.glob("outputs/*/*/summary.json"))


def test_the_gpu_extra_brings_the_cuda_libraries_and_nccl():
    # cupy-cuda12x alone has no NVRTC, no CUDA headers and no NCCL on a pip-only machine.
    import tomllib

    gpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert any(req.startswith("cupy-cuda12x[ctk]") for req in gpu), gpu
    assert any(req.startswith("nvidia-nccl-cu12") for req in gpu), gpu
