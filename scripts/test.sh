#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. .ci/run calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check rft rewards scripts tests
exec python -m pytest tests -q "$@"
