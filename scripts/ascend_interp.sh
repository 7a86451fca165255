#!/usr/bin/env bash
# Run the Triton kernel tests under triton-ascend's interpreter on a CPU-only machine.
#
# Sets up a SEPARATE venv (.venv-ascend in the repo root, git-ignored) holding triton-ascend
# 3.2.0, which installs itself as the `triton` package: upstream triton must not be in that venv
# ("Community Triton and Triton-Ascend cannot coexist"), so it gets its own environment; then runs
# `tests/kernels` with TRITON_INTERPRET=1. Idempotent: every install step is skipped when already
# satisfied. Extra arguments go to pytest (e.g. `-k rms_norm -x`).
#
# What we found (triton-ascend 3.2.0, torch 2.13.0+cpu, numpy 1.26, Python 3.11, no CANN, no NPU):
# * The interpreter runs: `import triton` needs neither CANN nor torch_npu; TRITON_INTERPRET=1
#   is the only environment variable needed. Plain kernels (masked loads/stores, block-table
#   gathers, reductions, exp/exp2, tl.dot in fp16/fp32, int64 offsets, bf16 *storage* with fp32
#   math, @triton.heuristics) give correct results on CPU torch tensors.
# * Anything that touches `triton.runtime.driver.active` fails: the only driver is NPUDriver,
#   whose is_active() runs the BiSheng compiler from CANN; without it Triton raises
#   "RuntimeError: 0 active drivers ([]). There should only be one." (after a warning about a
#   missing `ccec`). That includes the @triton.autotune DECORATOR itself (it calls
#   driver.active.get_benchmarker() at import time), triton.testing.do_bench, and
#   driver.active.get_current_target(). No environment variable avoids it (TRITON_ASCEND_ARCH
#   only matters once a driver is active; TRITON_NPU_COMPILER_PATH would have to point at a real
#   bishengir). So kernels must read tiles from the profile, not autotune, and backend detection
#   must check TRITON_INTERPRET before asking the driver.
# * Ascend extension ops are NOT interpretable in 3.2.0: tl.extract_slice / tl.insert_slice fail
#   (the interpreter builder has no create_extract_slice; InterpreterError). Kernels meant to be
#   tested here must keep such ops behind a constexpr switch that is off in the interpreter.
# * Launch options other than num_warps/num_stages/num_ctas/enable_fp_fusion/maxnreg are
#   rejected by the 3.2.0 interpreter (its RESERVED_KWS): `kernel[grid](..., multibuffer=True)`
#   raises "TypeError: kernel() got an unexpected keyword argument 'multibuffer'", although the
#   NPU launcher accepts it and upstream triton's interpreter ignores it. Host code must drop
#   Ascend compile options when TRITON_INTERPRET=1 (we do not patch the installed package).
# * tl.atomic_add on fp16 fails ("Unsupported data type"); fp32 atomics work. (Upstream triton
#   3.9's interpreter handles fp16 atomics.)
# * bfloat16 math inside kernels is unreliable in any Triton interpreter: load bf16, compute fp32.
# * Only the interpreter can run here: real compilation (and TRITON_COMPILE_ONLY=1) needs CANN's
#   bishengir-compile, which is not on PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${ASCEND_VENV:-$ROOT/.venv-ascend}

run() {
    echo "+ $*" >&2
    "$@"
}

pick_python() {
    # triton-ascend 3.2.0 ships wheels for CPython 3.9-3.11 only
    local c
    for c in ${PYTHON:-} python3.11 python3.10 python3.9 python3; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 &&
            "$c" -c 'import sys; sys.exit(not ((3, 9) <= sys.version_info[:2] <= (3, 11)))' 2>/dev/null; then
            echo "$c"
            return 0
        fi
    done
    echo "no Python 3.9-3.11 found (triton-ascend 3.2.0 has wheels for those only); set PYTHON=" >&2
    return 1
}

if [ ! -x "$VENV/bin/python" ]; then
    PY=$(pick_python)
    run "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { run "$VPY" -m pip install --quiet "$@"; }

# Is requirement $1 (a PEP 508 string) satisfied in the venv?
have() {
    "$VPY" - "$1" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version

req = sys.argv[1]
name, op, want = req, None, None
for o in ("==", "<"):
    if o in req:
        name, want = req.split(o, 1)
        op = o
        break
try:
    have = version(name)
except PackageNotFoundError:
    sys.exit(1)
if op == "==":
    sys.exit(have.split("+")[0] != want)
if op == "<":
    sys.exit(int(have.split(".")[0]) >= int(want))
sys.exit(0)
EOF
}

# Upstream triton (distribution "triton") shadows/corrupts triton-ascend: remove both, reinstall.
if have triton; then
    echo "upstream triton found in $VENV: removing it (it cannot coexist with triton-ascend)" >&2
    run "$VPY" -m pip uninstall --yes triton triton-ascend
fi

REQS=("torch==2.13.0" "triton-ascend==3.2.0" "numpy<2" "pybind11" "pytest" "hypothesis" "pyyaml" "tqdm")
missing=()
for r in "${REQS[@]}"; do
    have "$r" || missing+=("$r")
done
if [ ${#missing[@]} -gt 0 ]; then
    pip_install "${missing[@]}"
else
    echo "venv $VENV: all requirements present (${REQS[*]})" >&2
fi
if have triton; then
    echo "error: installing the requirements pulled in upstream triton; see pip output above" >&2
    exit 1
fi

# The project itself, editable and without its (GPU/HF) dependencies.
if ! "$VPY" - "$ROOT" <<'EOF' 2>/dev/null; then
import json, sys
from importlib.metadata import distributions
# (a portable_xy.egg-info in the work tree also shows up as a distribution: look at all of them)
urls = [
    json.loads(d.read_text("direct_url.json") or "{}").get("url", "")
    for d in distributions()
    if (d.metadata["Name"] or "").lower() == "portable-xy"
]
sys.exit(("file://" + sys.argv[1].rstrip("/")) not in [u.rstrip("/") for u in urls])
EOF
    pip_install -e . --no-deps
else
    echo "portable-xy already installed editable from $ROOT" >&2
fi

export TRITON_INTERPRET=1
export TOKENIZERS_PARALLELISM=false

# Smoke check: the interpreter of the triton that this venv holds really runs a kernel.
echo "+ TRITON_INTERPRET=1 $VPY <smoke kernel>" >&2
"$VPY" - <<'EOF'
import importlib.metadata as md

import torch
import triton
import triton.language as tl

dists = sorted(d.metadata["Name"] for d in md.distributions() if "triton" in (d.metadata["Name"] or "").lower())
assert dists == ["triton-ascend"], f"expected only triton-ascend, found {dists}"


@triton.jit
def _axpy(x, y, out, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out + offs, alpha * tl.load(x + offs, mask=m) + tl.load(y + offs, mask=m), mask=m)


n = 1000
x, y, out = torch.randn(n), torch.randn(n), torch.empty(n)
_axpy[(triton.cdiv(n, 128),)](x, y, out, n, 2.0, BLOCK=128)
torch.testing.assert_close(out, 2.0 * x + y)
print(f"smoke: triton {triton.__version__} (triton-ascend) interpreter OK, torch {torch.__version__}")
EOF

if [ ! -d tests/kernels ]; then
    echo "tests/kernels does not exist yet: nothing more to run" >&2
    exit 0
fi
set +e
# -W: triton-ascend's interpreter converts 1-element arrays with int(), which numpy >= 1.25 flags
# with a DeprecationWarning on every such call (tens of thousands per run)
run "$VPY" -m pytest -q -p no:cacheprovider -W "ignore:Conversion of an array with ndim:DeprecationWarning" \
    tests/kernels "$@"
rc=$?
set -e
# pytest exit 5 = no tests collected
if [ $rc -eq 5 ]; then
    echo "no kernel tests collected" >&2
    exit 0
fi
exit $rc
