"""Time-between-tokens stability while long prompts arrive: the token-wise P/D/V scheduler vs a
prefill-first policy (nano-vllm's / vLLM v0's), same workload, same run.

    python benchmarks/tbt_stability.py [--model PATH] [--max-num-batched-tokens 512] [--decoders 8]
        [--long-prompts 6] [--long-len 1500] [--every 6]

``--decoders`` chat requests decode ``--decode-tokens`` tokens each; meanwhile a
``--long-len``-token prompt arrives every ``--every`` engine steps. Reported per policy: the max,
p99 and median gap between consecutive output tokens of the decoding requests, their total time,
and the long prompts' mean TTFT (steps are driven through ``LLM.engine`` so arrivals are
deterministic).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from portable_xy import LLM, SamplingParams
from portable_xy.engine_args import add_engine_args, engine_kwargs


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(llm: LLM, args, chat_prompts: list[list[int]], long_prompts: list[list[int]]) -> dict:
    eng = llm.engine
    dec = SamplingParams(temperature=0, max_tokens=args.decode_tokens, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    tracked = []
    for i, p in enumerate(chat_prompts):
        eng.add_request(f"d{i}", None, p, dec)
        tracked.append(eng.requests[f"d{i}"].seqs[0])
    stamps: dict[int, list[float]] = {s.seq_id: [] for s in tracked}
    counts = {s.seq_id: 0 for s in tracked}
    long_reqs = []
    step = 0
    t_start = time.perf_counter()
    while eng.has_unfinished_requests() or len(long_reqs) < len(long_prompts):
        if step > 0 and step % args.every == 0 and len(long_reqs) < len(long_prompts):
            rid = f"L{step}"
            eng.add_request(rid, None, long_prompts[len(long_reqs)], short)
            long_reqs.append(eng.requests[rid])
        eng.step()
        now = time.perf_counter()
        for s in tracked:
            while counts[s.seq_id] < s.num_output_tokens:
                counts[s.seq_id] += 1
                stamps[s.seq_id].append(now)
        step += 1
    total = time.perf_counter() - t_start
    gaps = [b - a for ts in stamps.values() for a, b in zip(ts, ts[1:])]
    ttft = [r.metrics.ttft for r in long_reqs]
    return {
        "max": max(gaps),
        "p99": percentile(gaps, 0.99),
        "p50": statistics.median(gaps),
        "decode_done": max(ts[-1] for ts in stamps.values()) - t_start,
        "total": total,
        "long_ttft": statistics.mean(ttft) if ttft else 0.0,
        "outputs": [s.output_token_ids for s in tracked],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap, max_model_len=2048, max_num_batched_tokens=512, enable_prefix_caching=False)
    ap.add_argument("--decoders", type=int, default=8)
    ap.add_argument("--decode-tokens", type=int, default=96)
    ap.add_argument("--long-prompts", type=int, default=6)
    ap.add_argument("--long-len", type=int, default=1500)
    ap.add_argument("--every", type=int, default=6, help="engine steps between long-prompt arrivals")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    chat = [torch.randint(100, 40000, (32,), generator=g).tolist() for _ in range(args.decoders)]
    longs = [torch.randint(100, 40000, (args.long_len,), generator=g).tolist() for _ in range(args.long_prompts)]
    results = {}
    for policy in ("tokenwise", "prefill_first"):
        llm = LLM(**engine_kwargs(args, scheduler_policy=policy))
        run(llm, args, chat[:1], longs[:0])  # warm-up
        results[policy] = run(llm, args, chat, longs)
    print(
        f"budget={args.max_num_batched_tokens} decoders={args.decoders} "
        f"long prompts={args.long_prompts}x{args.long_len} "
        f"every {args.every} steps, dtype={llm.dtype}"
    )
    print(f"{'policy':>14} {'max TBT':>9} {'p99 TBT':>9} {'p50 TBT':>9} {'decodes done':>12} {'long TTFT':>10}")
    for policy, r in results.items():
        print(
            f"{policy:>14} {r['max'] * 1e3:7.0f}ms {r['p99'] * 1e3:7.0f}ms {r['p50'] * 1e3:7.0f}ms "
            f"{r['decode_done']:11.2f}s {r['long_ttft']:9.2f}s"
        )
    tw, pf = results["tokenwise"], results["prefill_first"]
    print(f"prefill_first / tokenwise: max TBT {pf['max'] / tw['max']:.2f}x, p99 TBT {pf['p99'] / tw['p99']:.2f}x")
    print(f"decode outputs identical across policies: {tw['outputs'] == pf['outputs']}")


if __name__ == "__main__":
    main()
