"""The house rules of the source tree: layers import only downwards, the README's layout
table matches the tree, and common tooling sees every source file."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "dtrain"

# Each module or package of dtrain and its layer: a module may import from lower layers
# and from its own package only. nn, comm and data share a layer and so never import
# each other (the layers know nothing of devices' communication, and vice versa).
LAYERS = {
    "checks": 0,
    "backend": 1, "threads": 1, "atomic": 1, "image_grid": 1, "allocator": 1,
    "nn": 2, "comm": 2, "data": 2,
    "optim": 3, "models": 3,
    "config": 4, "checkpoint": 4, "tensorboard": 4,
    "export": 5, "precision": 5, "preemption": 5,
    "parallel": 6,
    "timeline": 7, "rundir": 7,
    "context": 8,
    "evaluate": 9,
    "train": 10,
    "app": 11,
    "__main__": 12, "launch": 12,
}


def unit(module: str) -> str:
    """``dtrain.nn.conv`` -> ``nn``: the layered unit a dotted module name belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def dtrain_imports(path: Path) -> set[str]:
    """Every ``dtrain...`` module imported anywhere in ``path`` (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dtrain"):
            if node.module != "dtrain":
                found.add(node.module)
            for alias in node.names if node.module == "dtrain" else ():  # a submodule, or a name of dtrain/__init__
                submodule = (PACKAGE / f"{alias.name}.py").exists() or (PACKAGE / alias.name).is_dir()
                found.add(f"dtrain.{alias.name}" if submodule else "dtrain")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dtrain."))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    units = {unit(".".join(p.relative_to(REPO).with_suffix("").parts)) for p in SOURCES} - {"__init__"}
    assert units == set(LAYERS), f"give these a layer: {sorted(units ^ set(LAYERS))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_only_go_down(path):
    me = unit(".".join(path.relative_to(REPO).with_suffix("").parts))
    if me == "__init__":
        return
    layers = {"__init__": -1, **LAYERS}  # dtrain/__init__.py sits below everything: it imports nothing of dtrain
    upward = [m for m in dtrain_imports(path) if unit(m) != me and layers[unit(m)] >= layers[me]]
    assert not upward, f"{path.relative_to(REPO)} (layer {LAYERS[me]}) imports {upward}"


def test_importing_dtrain_loads_no_numpy():
    # python -m dtrain sets OpenBLAS's spin timeout from dtrain/__init__.py before NumPy loads OpenBLAS
    code = "import sys, dtrain; dtrain.limit_openblas_spin(); print(sorted({'numpy', 'dtrain.app'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"
    # and the entry point sets it before it imports the app (and with it NumPy)
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    code = ("import builtins, os; real = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name == 'numpy': print(os.environ.get('OPENBLAS_THREAD_TIMEOUT')); builtins.__import__ = real\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\n"
            "import dtrain.__main__")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, env=env)
    assert out.stdout.splitlines()[0] == "16", out.stdout + out.stderr


def test_readme_layout_matches_the_tree():
    text = (REPO / "README.md").read_text()
    section = text.split("## Layout", 1)[1]
    listed = set(re.findall(r"\| `([^`]+)` \|", section))
    for path in listed:
        for single in re.split(r",\s*", path):
            assert (REPO / single).exists(), f"README's layout lists {single}, which does not exist"
    covered = " ".join(listed) + " " + section
    for path in SOURCES:
        rel = path.relative_to(REPO)
        if path.name == "__init__.py":
            continue
        name = str(rel) if rel.parent == Path("dtrain") else path.name
        assert name in covered or str(rel) in covered, f"README's layout does not mention {rel}"
    for package in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        assert f"`{package.relative_to(REPO)}/`" in section, f"README's layout lacks {package.relative_to(REPO)}/"


def test_every_file_the_readmes_name_exists():
    for readme in (REPO / "README.md", REPO / "launch" / "README.md"):
        named = set(re.findall(r"\b((?:dtrain|tests|scripts|launch|conf)/[\w./-]*\w)", readme.read_text()))
        # conf/ is installed as dtrain/conf (pyproject.toml's package-dir)
        missing = sorted(path for path in named if not (REPO / re.sub(r"^dtrain/conf(?=/|$)", "conf", path)).exists())
        assert not missing, f"{readme.relative_to(REPO)} names files that do not exist: {missing}"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_githubs_python_gitignore_ignores_no_source_file(tmp_path):
    sources = [str(p.relative_to(REPO)) for p in sorted(REPO.glob("*/**/*")) if p.is_file()
               and p.suffix in (".py", ".yaml", ".sh", ".md", ".sbatch", ".toml")
               and not any(part.startswith(".") or part in ("outputs", "multirun", "build") for part in p.parts)
               and "__pycache__" not in p.parts and "egg-info" not in str(p)]
    assert any(s.startswith("dtrain/comm/") for s in sources)
    repo = tmp_path / "clone"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    shutil.copy(REPO / "tests" / "data" / "github-python.gitignore", repo / ".gitignore")
    proc = subprocess.run(["git", "check-ignore", "--no-index", "--stdin", "-v"], cwd=repo, text=True,
                          input="\n".join(sources), capture_output=True)
    assert proc.returncode == 1 and not proc.stdout, f"ignored by GitHub's Python template:\n{proc.stdout}"


def test_ruff_default_settings_reach_every_module():
    ruff = shutil.which("ruff") or str(Path(__import__("sys").executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install ruff)")
    proc = subprocess.run([ruff, "check", "--show-files", "."], cwd=REPO, capture_output=True, text=True)
    seen = {Path(line.strip()).resolve() for line in proc.stdout.splitlines() if line.strip().endswith(".py")}
    missing = [str(p.relative_to(REPO)) for p in SOURCES if p.resolve() not in seen]
    assert not missing, f"ruff check . skips {missing}"
