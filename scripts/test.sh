#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. .ci/run calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report test renders the HTML page in a real headless browser.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the browser test will skip"
fi
. .venv/bin/activate
ruff check rft rewards environments scripts tests
exec python -m pytest tests -q "$@"
