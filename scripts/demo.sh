#!/usr/bin/env bash
# Quick start 1: set up, then generate with the default model (SmolLM2-135M-Instruct) on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/generate.py "$@"
