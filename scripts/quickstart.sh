#!/usr/bin/env bash
# Set up (scripts/setup.sh) and train recipes/quickstart.yaml on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec rft train recipes/quickstart.yaml "$@"
