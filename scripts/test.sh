#!/usr/bin/env bash
# The project's test command: set-up (idempotent, cached), then the test suite.
# Long runs are marked `slow` and opt-in: scripts/test.sh -m slow
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh"
VENV="${HVD_GRADALIGN_VENV:-$REPO/.venv}"
cd "$REPO"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
exec "$VENV/bin/python" -m pytest "$@"
