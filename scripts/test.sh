#!/usr/bin/env bash
# Quick start 2: set up (with the dev extras), lint, then run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
. .venv/bin/activate
ruff check .
python -m pytest -q --durations=15 "$@"
