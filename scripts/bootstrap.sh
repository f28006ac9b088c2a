#!/usr/bin/env bash
# Create the project's virtual environment (.venv) and install dtrain with the given
# extras into it; re-installs only when pyproject.toml changes. Sourced by train.sh/test.sh.
# Usage: source scripts/bootstrap.sh EXTRAS   (e.g. "mpi" or "test")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DTRAIN_VENV:-$ROOT/.venv}"
EXTRAS="$1"
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
STAMP="$VENV/.dtrain-installed-$EXTRAS-$(cksum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ]; then
    echo "dtrain: installing into $VENV (extras: $EXTRAS) ..." >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRAS]"
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# OpenMPI refuses to run as root unless told; containers and CI often run as root.
if [ "$(id -u)" = "0" ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
