"""``portable-xy serve`` against vLLM's own OpenAI server on the same model and loads, with the same
client (``portable-xy bench serve``).

    python benchmarks/serve_vs_vllm.py --vllm-python /path/to/vllm-venv/bin/python \\
        --vllm-model DIR [--model PATH] [--rounds 2] [--output-len 96]

``--vllm-model``: the model as an HF safetensors directory (vLLM's CPU build does not read our
GGUF); ``--model``: the same weights for portable_xy (default: the SmolLM2 GGUF). vLLM is started as
``python -m vllm.entrypoints.openai.api_server`` with ``VLLM_CPU_OMP_THREADS_BIND`` set to every
core and ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``. Loads: a burst of 32 streaming chat requests, and
Poisson arrivals at 4 requests/s for 48 requests; greedy, ``--output-len`` tokens, EOS ignored.
Only one server runs at a time; each round starts both in turn (the order alternates), warms each
up, then runs every load. Reported per engine and load: output tok/s, TTFT p99 and ITL p99 (median
over rounds), and the ratios ours / vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess

from portable_xy.engine_args import add_engine_args, engine_flags
from portable_xy.tools.bench.serve import (
    TOPICS,
    BenchRequest,
    run_benchmark,
    serve_command,
    start_server,
    stop_server,
    summarize,
)

LOADS = {"burst 32": (32, float("inf")), "poisson 4 req/s x 48": (48, 4.0)}


def start(engine: str, args) -> tuple[subprocess.Popen, str]:
    if engine == "vllm":
        cores = f"0-{os.cpu_count() - 1}"
        env = dict(VLLM_CPU_OMP_THREADS_BIND=cores, VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="2")
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.vllm_model,
               "--dtype", "bfloat16", "--max-model-len", "2048", "--served-model-name", "m"]  # fmt: skip
        return start_server(cmd, env, timeout=600)
    return start_server(serve_command(args.model, *engine_flags(args), "--served-model-name", "m"), timeout=600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", required=True)
    ap.add_argument("--vllm-model", required=True)
    add_engine_args(ap, max_model_len=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=96)
    args = ap.parse_args()
    texts = [f"Write a detailed essay about {TOPICS[i % len(TOPICS)]}. (#{i})" for i in range(48)]
    reqs = [BenchRequest([{"role": "user", "content": t}], None, args.output_len) for t in texts]
    got: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for engine in ("portable_xy", "vllm") if r % 2 == 0 else ("vllm", "portable_xy"):
            proc, url = start(engine, args)
            try:
                bench = argparse.Namespace(base_url=url, endpoint="/v1/chat/completions", model="m", api_key=None,
                                           temperature=0.0, ignore_eos=True, max_concurrency=None, burstiness=1.0,
                                           seed=r, progress=False, request_rate=float("inf"))  # fmt: skip
                asyncio.run(run_benchmark(bench, reqs[:8]))  # warm-up
                for load, (n, rate) in LOADS.items():
                    bench.request_rate = rate
                    res, duration = asyncio.run(run_benchmark(bench, reqs[:n]))
                    s = summarize(res, duration, None, None)
                    assert s["failed"] == 0, (engine, s["errors"])
                    got.setdefault((engine, load), []).append(s)
                    print(f"round {r + 1} {engine:>11} {load:<22} {s['output_tok_s']:7.1f} tok/s  TTFT p99 "
                          f"{s['ttft_s']['p99']:.3f} s  ITL p99 {s['itl_s']['p99'] * 1e3:6.1f} ms", flush=True)
            finally:
                stop_server(proc)
    print(f"\n{'load':<22} {'engine':>11} {'tok/s':>8} {'TTFT p99 s':>11} {'ITL p99 ms':>11}")
    med = {}
    for (engine, load), runs in sorted(got.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        m = med[engine, load] = (statistics.median(x["output_tok_s"] for x in runs),
                                 statistics.median(x["ttft_s"]["p99"] for x in runs),
                                 statistics.median(x["itl_s"]["p99"] for x in runs))  # fmt: skip
        print(f"{load:<22} {engine:>11} {m[0]:8.1f} {m[1]:11.3f} {m[2] * 1e3:11.1f}")
    for load in LOADS:
        ours, theirs = med["portable_xy", load], med["vllm", load]
        print(f"{load}: throughput {ours[0] / theirs[0]:.2f}x vLLM, ITL p99 {theirs[2] / ours[2]:.2f}x lower, "
              f"TTFT p99 {theirs[1] / ours[1]:.2f}x lower")


if __name__ == "__main__":
    main()
