#!/usr/bin/env bash
# The oldest supported Triton (3.6, the version on the GPU machines we borrow) on a CPU-only host:
# a SEPARATE venv (.venv-triton36 in the repo root, git-ignored) with torch 2.13.0, triton 3.6.0
# and numpy < 2.3 (Triton 3.6's interpreter fails on numpy 2.4's 0-d conversions). Runs
# tests/kernels under its interpreter, then `kernels aot-report` for sm_80 and sm_90 and for AMD
# gfx942, gfx90a and gfx1100 compiled by Triton 3.6 (every config must be clean: no spills, shared
# memory / LDS within the limit, tensor cores / MFMA / WMMA where expected). Idempotent;
# extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${TRITON36_VENV:-$ROOT/.venv-triton36}
REQS=("torch==2.13.0" "triton==3.6.0" "numpy<2.3" "pytest" "hypothesis" "pyyaml" "tqdm")

if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.installed-$(echo "${REQS[*]}" | md5sum | cut -c1-8)"
if [ ! -f "$stamp" ]; then
    "$VPY" -m pip install --quiet "${REQS[@]}"
    touch "$stamp"
fi
if ! "$VPY" -c "import os, portable_xy; raise SystemExit(not os.path.samefile(os.path.dirname(portable_xy.__file__), 'portable_xy'))" 2>/dev/null; then
    "$VPY" -m pip install --quiet --no-deps --no-build-isolation -e .
fi
"$VPY" -c "import triton, torch; print(f'triton {triton.__version__}, torch {torch.__version__}')"

# -W: Triton 3.6's interpreter converts 1-element arrays with int(), which numpy >= 1.25 flags
TRITON_INTERPRET=1 "$VPY" -m pytest -q -p no:cacheprovider -W "ignore:Conversion of an array with ndim:DeprecationWarning" \
    tests/kernels "$@"
"$VPY" -m portable_xy.cli kernels aot-report --arch sm_80 --arch sm_90 | grep -E "FAIL|configs:"
"$VPY" -m portable_xy.cli kernels aot-report --arch gfx942 --arch gfx90a --arch gfx1100 | grep -E "FAIL|configs:"
