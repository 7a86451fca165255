#!/usr/bin/env bash
# The hardware validation kit: installs portable_xy offline (no network, no package index, no
# dependency resolution) into the current Python unless it is already importable from this
# checkout, then runs `portable-xy selfcheck`.
#   scripts/device_check.sh [--backend cuda|rocm|npu|interpret] [--out DIR] [--quick] [--budget-s S]
# Writes DIR/NN_stage.json per stage and DIR/summary.md as it goes; exits non-zero on any
# correctness failure. PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
echo "[$(date +%H:%M:%S)] device_check: $("$PY" --version 2>&1), $(git rev-parse --short HEAD 2>/dev/null || echo no-git)" >&2
if ! "$PY" -c "import portable_xy, os, sys; sys.exit(0 if os.path.samefile(os.path.dirname(portable_xy.__file__), 'portable_xy') else 1)" 2>/dev/null; then
  echo "[$(date +%H:%M:%S)] installing portable_xy from $(pwd) (offline: --no-deps --no-build-isolation)" >&2
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >&2
fi
for arg in "$@"; do
  if [ "$arg" = interpret ]; then export TRITON_INTERPRET=1; fi
done
exec "$PY" -m portable_xy.cli selfcheck "$@"
