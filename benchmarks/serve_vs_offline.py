"""The server's overhead: output tok/s of ``portable-xy serve`` driven by ``bench serve``
(``--concurrency`` streaming chat clients at once) against offline ``LLM.generate`` on the same
chat prompts and output lengths, measured side by side in one run.

    python benchmarks/serve_vs_offline.py [--model PATH] [--concurrency 32] [--output-len 128]
        [--rounds 3] [--dtype auto]

The server and the offline engine each run in a process of their own, both loaded first; each
round runs the offline batch, then the same requests through the server, in reverse order every
other round. Greedy, EOS ignored, prefix caching off, so both do the same work. Reported: each
side's output tok/s per round and the median of the per-round ratio server / offline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys

from portable_xy.engine_args import add_engine_args, engine_flags, engine_kwargs
from portable_xy.tools.bench.serve import (
    TOPICS,
    BenchRequest,
    run_benchmark,
    serve_command,
    start_server,
    stop_server,
    summarize,
)

OFFLINE = """
import json, sys, time
from portable_xy import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[1]))
print("READY", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    params = SamplingParams(temperature=0, max_tokens=req["output_len"], ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.chat([[m] for m in req["messages"]], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    print(sum(len(o.outputs[0].token_ids) for o in outs) / dt, flush=True)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap, enable_prefix_caching=False)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    messages = [{"role": "user", "content": f"Write a detailed essay about {TOPICS[i % len(TOPICS)]}. (#{i})"}
                for i in range(args.concurrency)]  # fmt: skip
    offline = subprocess.Popen([sys.executable, "-c", OFFLINE, json.dumps(engine_kwargs(args))], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    server = None
    try:
        server, url = start_server(serve_command(args.model, *engine_flags(args), "--served-model-name", "m"))
        assert offline.stdout.readline().startswith("READY")
        bench = argparse.Namespace(base_url=url, endpoint="/v1/chat/completions", model="m", api_key=None,
                                   temperature=0.0, ignore_eos=True, max_concurrency=None, request_rate=float("inf"),
                                   burstiness=1.0, seed=0, progress=False)  # fmt: skip
        reqs = [BenchRequest([m], None, args.output_len) for m in messages]

        def run_offline() -> float:
            offline.stdin.write(json.dumps({"messages": messages, "output_len": args.output_len}) + "\n")
            offline.stdin.flush()
            return float(offline.stdout.readline())

        def run_server() -> float:
            results, duration = asyncio.run(run_benchmark(bench, reqs))
            s = summarize(results, duration, None, None)
            assert s["failed"] == 0, s["errors"]
            return s["output_tok_s"]

        run_offline(), run_server()  # warm-up
        rows = []
        for r in range(args.rounds):
            order = [("offline", run_offline), ("server", run_server)]
            got = dict((name, fn()) for name, fn in (order if r % 2 == 0 else order[::-1]))
            rows.append(got)
            print(f"round {r + 1}: offline {got['offline']:.1f} tok/s, server {got['server']:.1f} tok/s "
                  f"({got['server'] / got['offline']:.2f}x)", flush=True)  # fmt: skip
        ratios = [x["server"] / x["offline"] for x in rows]
        print(f"\nserver / offline at {args.concurrency} streaming clients x {args.output_len} tokens: "
              f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")  # fmt: skip
    finally:
        if server is not None:
            stop_server(server)
        offline.terminate()
        offline.wait(30)


if __name__ == "__main__":
    main()
