"""XY-Serve's scheduling claim over HTTP with a real client: the token-wise P/D/V scheduler against
prefill-first (nano-vllm / vLLM v0 style), each behind ``portable-xy serve`` at the same load.

    python benchmarks/scheduler_over_http.py [--model PATH] [--rate 1.5] [--requests 60]
        [--long-share 0.25] [--long-len 1500] [--output-len 64] [--max-num-batched-tokens 512]
        [--slo-ttft-ms 4000] [--slo-itl-ms 500] [--out docs/serving] [--seed 0]

Workload: chat requests arriving as a Poisson process at ``--rate`` requests/s; a share
``--long-share`` of them carry a ``--long-len``-token document to summarise, the rest a one-line
question; each generates ``--output-len`` tokens (greedy, EOS ignored). Both servers get the same
requests at the same arrival times (one after the other, alone on the machine), with a step
budget of ``--max-num-batched-tokens`` tokens and no prefix caching. Reported per policy: throughput, goodput
under the SLO, TTFT and ITL percentiles; written as ``OUT.json`` and ``OUT.png`` (ITL and TTFT
CDFs of both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
from pathlib import Path

import numpy as np

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

FILLER = ("The committee reviewed the quarterly figures, the supply schedule and the staffing plan, and noted "
          "that the new warehouse reduced delivery times while raising storage costs. ")  # fmt: skip


def workload(args) -> list[BenchRequest]:
    rng = random.Random(args.seed)
    doc_words = FILLER * (args.long_len // 30 + 1)
    reqs = []
    for i in range(args.requests):
        if rng.random() < args.long_share:
            content = f"Summarise this report in three sentences (#{i}):\n{doc_words}"
        else:
            content = f"What is one fact about {rng.choice(TOPICS)}? (#{i})"
        reqs.append(BenchRequest([{"role": "user", "content": content}], None, args.output_len))
    return reqs


def serve(args, policy: str) -> tuple[subprocess.Popen, str]:
    flags = engine_flags(args, scheduler_policy=policy)
    return start_server(serve_command(args.model, *flags, "--served-model-name", "m"), timeout=300)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --seed seeds the workload too
    add_engine_args(ap, max_num_batched_tokens=512, enable_prefix_caching=False, max_model_len=4096)
    ap.add_argument("--rate", type=float, default=1.5)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--long-share", type=float, default=0.25)
    ap.add_argument("--long-len", type=int, default=1500)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--slo-ttft-ms", type=float, default=4000)
    ap.add_argument("--slo-itl-ms", type=float, default=500)
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    args = ap.parse_args()
    reqs = workload(args)
    results = {}
    for policy in ("tokenwise", "prefill_first"):
        proc, url = serve(args, policy)
        try:
            bench = argparse.Namespace(base_url=url, endpoint="/v1/chat/completions", model="m", api_key=None,
                                       temperature=0.0, ignore_eos=True, max_concurrency=None, request_rate=args.rate,
                                       burstiness=1.0, seed=args.seed, progress=False)  # fmt: skip
            asyncio.run(run_benchmark(bench, reqs[:4]))  # warm-up
            res, duration = asyncio.run(run_benchmark(bench, reqs))
            results[policy] = (res, summarize(res, duration, args.slo_ttft_ms, args.slo_itl_ms))
        finally:
            stop_server(proc)
        s = results[policy][1]
        itl, ttft = s["itl_s"], s["ttft_s"]
        worst = max(g for r in res if r.ok for g in r.itls)
        print(f"{policy:>14}: {s['completed']} done, {s['output_tok_s']:.1f} tok/s, goodput {s['goodput_req_s']:.2f} "
              f"req/s ({s['slo']['attainment']:.0%} in SLO), TTFT p50/p99 {ttft['p50']:.2f}/{ttft['p99']:.2f} s, "
              f"ITL p50/p99 {itl['p50'] * 1e3:.0f}/{itl['p99'] * 1e3:.0f} ms, max ITL {worst * 1e3:.0f} ms",
              flush=True)  # fmt: skip
    tw, pf = results["tokenwise"][1], results["prefill_first"][1]
    print(f"prefill_first / tokenwise: ITL p99 {pf['itl_s']['p99'] / tw['itl_s']['p99']:.2f}x, "
          f"goodput {tw['goodput_req_s'] / max(pf['goodput_req_s'], 1e-9):.2f}x in favour of token-wise")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"args": vars(args), "summary": {p: s for p, (_, s) in results.items()}}
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for policy, (res, _) in results.items():
            for ax, xs in zip(axes, ([g for r in res if r.ok for g in r.itls], [r.ttft for r in res if r.ok])):
                xs = np.sort(np.asarray(xs) * 1e3)
                ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=policy)
        for ax, name in zip(axes, ("inter-token latency (ms)", "time to first token (ms)")):
            ax.set_xscale("log")
            ax.set_xlabel(name)
            ax.set_ylabel("fraction")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{args.requests} chat requests, Poisson {args.rate} req/s, {args.long_share:.0%} with "
                     f"{args.long_len}-token documents, budget {args.max_num_batched_tokens}")  # fmt: skip
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
