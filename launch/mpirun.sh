#!/usr/bin/env bash
# Data-parallel dtrain with Open MPI: one rank per GPU (or per CPU worker).
# Every argument goes to `python -m dtrain` as a Hydra override:
#
#   NP=4 launch/mpirun.sh device=gpu model=alexnet trainer.epochs=3
#   NP=2 HOSTFILE=launch/hostfile.example launch/mpirun.sh device=gpu
#   NP=3 OVERSUBSCRIBE=1 launch/mpirun.sh device=cpu     # more ranks than cores (testing only)
#
# Environment:
#   NP             number of ranks (default 2)
#   HOSTFILE       Open MPI hostfile for several nodes (see hostfile.example)
#   OVERSUBSCRIBE  1: allow more ranks than slots/cores
#   MPIRUN         mpirun to use (default: the one next to `python`, else the one on PATH)
#   PYTHON         interpreter (default: python)
#   MPIRUN_ARGS    extra mpirun options, e.g. "--bind-to none" or "--map-by slot:PE=4"
# NCCL_* variables set here are forwarded to every rank (-x), also on remote nodes.
set -euo pipefail

PYTHON=${PYTHON:-python}
if [[ -z "${MPIRUN:-}" ]]; then
    beside="$(dirname "$(command -v "$PYTHON")")/mpirun"
    if [[ -x "$beside" ]]; then MPIRUN=$beside; else MPIRUN=$(command -v mpirun || true); fi
fi
if [[ -z "$MPIRUN" ]]; then
    echo "launch/mpirun.sh: mpirun not found; pip install 'dtrain[mpi]' or install Open MPI" >&2
    exit 2
fi

args=(-n "${NP:-2}")
[[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
[[ "${OVERSUBSCRIBE:-0}" == 1 ]] && args+=(--oversubscribe)
for var in $(compgen -e | grep '^NCCL_' || true); do args+=(-x "$var"); done
[[ -n "${PYTHONPATH:-}" ]] && args+=(-x PYTHONPATH)
# shellcheck disable=SC2206  # MPIRUN_ARGS is deliberately split into words
[[ -n "${MPIRUN_ARGS:-}" ]] && args+=(${MPIRUN_ARGS})

if [[ "$(id -u)" == 0 ]]; then  # containers often run as root; Open MPI refuses that by default
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
exec "$MPIRUN" "${args[@]}" "$PYTHON" -m dtrain "$@"
