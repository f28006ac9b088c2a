#!/usr/bin/env bash
# The main job: installs what it needs, then trains with the default config
# (AlexNet-scale CNN on MNIST; offline it falls back to the built-in MNIST sample).
# Any Hydra override passes through: bash scripts/train.sh model=lenet trainer.epochs=3
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" mpi
cd "$ROOT"
exec python -m dtrain "$@"
