#!/usr/bin/env bash
# Regenerate the simulator reports under docs/ (CPU only, no device): docs/simulator.{md,json} and
# docs/img/sim_*.png (about 15 minutes on one core), then docs/tp/ (tensor-parallel runs). The JSON
# files hold every row and are not committed; the Markdown reports and the plots are.
#   scripts/regen_reports.sh [single|tp]   (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
what=${1:-both}
common=(--policies tokenwise,prefill_first,decode_first --workloads coding,conversation --seed 0 --ttft-target-s 2
        --max-num-seqs 256 --step-overhead-ms 2 --flops-eff 0.7 --bw-eff 0.8)
if [ "$what" != tp ]; then
  "$PY" -m portable_xy.cli bench simulate --profile cuda/sm90 --profile cuda/sm80 --profile ascend/910b \
    --models llama2-7b,qwen2-7b --num-requests 500 --tbt-target-ms 100 --budget 1024 --kv-cache-gib 40 \
    "${common[@]}" --out docs
fi
if [ "$what" != single ]; then
  "$PY" -m portable_xy.cli bench simulate --profile cuda/sm90 --profile ascend/910b \
    --models llama2-70b@tp4,llama2-70b@tp8,qwen2.5-72b@tp4,qwen2.5-72b@tp8 --num-requests 300 --tbt-target-ms 200 \
    --budget 512 --kv-cache-gib auto "${common[@]}" --out docs/tp
fi
