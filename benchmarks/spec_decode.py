"""Speculative decoding speedup on input-grounded prompts (edit / summarise a given text or code),
measured side by side in one run: no speculation vs n-gram prompt lookup (and optionally a draft
model), single-stream and with concurrent requests.

    python benchmarks/spec_decode.py [--model PATH] [--dtype auto] [--k 4] [--concurrency 8]
        [--max-tokens 128] [--draft PATH] [--repeats 2]

Greedy, so every configuration must produce the same text (checked). Reported per configuration:
wall-clock output tokens/s, tokens per target forward pass (output tokens / engine steps the
request took part in, single-stream), the acceptance statistics, and how many outputs are
token-identical to the run without speculation (always all in fp32; in bf16 a verify step's
different GEMM shape can flip a greedy near-tie, as any change of batch composition can).
"""

from __future__ import annotations

import argparse
import time

from portable_xy import LLM, SamplingParams
from portable_xy.engine_args import add_engine_args, engine_kwargs

CODE = """def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
"""
TEXT = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. Residents said the "
    "lanes made the street safer for children walking to school, while several shop owners worried that "
    "removing parking spaces would hurt their business. The council agreed to count visitors for three "
    "months and to review the decision in the spring, when the data on traffic and sales will be available."
)
TASKS = [
    f"Rename the function moving_average to rolling_mean and the variable total to running_sum. "
    f"Return the whole code.\n\n{CODE}",
    f"Add a docstring to this function and return the whole code unchanged otherwise.\n\n{CODE}",
    f"Repeat the following paragraph, fixing nothing, then give it a title.\n\n{TEXT}",
    f"Summarise this paragraph, quoting its key sentences word for word.\n\n{TEXT}",
    f"Convert this function to use a while loop instead of a for loop. Return the whole code.\n\n{CODE}",
    f"Rewrite the paragraph in the past perfect tense where possible, keeping every detail.\n\n{TEXT}",
    f"Add type hints to this function and return the whole code.\n\n{CODE}",
    f"Copy the paragraph and underline (with **) every mention of the council.\n\n{TEXT}",
]


def run(llm: LLM, convs, params) -> tuple[float, list, int]:
    steps0 = llm.engine.num_steps
    t0 = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    return time.perf_counter() - t0, outs, llm.engine.num_steps - steps0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap, max_model_len=2048, enable_prefix_caching=False)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--draft", default=None, help="also run a draft model (same vocabulary)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per configuration (best is kept)")
    args = ap.parse_args()

    configs = {
        "off": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    }
    if args.draft:
        configs["draft"] = {"method": "draft_model", "model": args.draft, "num_speculative_tokens": args.k}
    # prefix caching off: a repeat would otherwise find its prompt cached, skip its prefill and, in
    # bf16, compute the last prompt token through another attention path (a near tie may flip),
    # so repeats would neither cost the same nor compare like for like
    llms = {
        name: LLM(**engine_kwargs(args, speculative_config=cfg)) for name, cfg in configs.items()
    }
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    print(f"model={args.model or 'SmolLM2-135M-Instruct'} dtype={llms['off'].dtype} k={args.k}")
    for label, convs in (
        ("single-stream", [[{"role": "user", "content": t}] for t in TASKS[:4]]),
        (f"{args.concurrency} concurrent", [[{"role": "user", "content": t}] for t in TASKS[: args.concurrency]]),
    ):
        single = label == "single-stream"
        results = {}
        for name, llm in llms.items():
            run(llm, convs[:1], SamplingParams(temperature=0, max_tokens=4))  # warm-up
            best = None
            for _ in range(args.repeats):
                if single:  # one request at a time
                    dt, outs, steps = 0.0, [], 0
                    for c in convs:
                        d, o, s = run(llm, [c], params)
                        dt, outs, steps = dt + d, outs + o, steps + s
                else:
                    dt, outs, steps = run(llm, convs, params)
                if best is None or dt < best[0]:
                    best = (dt, outs, steps)
            results[name] = best
        ref = [o.outputs[0].token_ids for o in results["off"][1]]
        base_dt = results["off"][0]
        print(f"\n## {label}")
        print(f"{'config':>8} {'tok/s':>8} {'speedup':>8} {'tok/fwd':>8} {'accept':>7} {'mean acc len':>12} same")
        for name, (dt, outs, steps) in results.items():
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            drafts = sum(o.metrics.num_draft_tokens for o in outs)
            acc = sum(o.metrics.num_accepted_tokens for o in outs)
            verif = sum(o.metrics.num_verify_steps for o in outs)
            same = sum(o.outputs[0].token_ids == r for o, r in zip(outs, ref))
            rate = f"{acc / drafts:.2f}" if drafts else "-"
            mal = f"{1 + acc / verif:.2f}" if verif else "-"
            per_fwd = f"{n_out / steps:.2f}" if single else "-"
            same = f"{same}/{len(ref)}"
            print(f"{name:>8} {n_out / dt:8.1f} {base_dt / dt:7.2f}x {per_fwd:>8} {rate:>7} {mal:>12} {same}")


if __name__ == "__main__":
    main()
