"""Where a decode token's time goes: single-stream greedy generation on the cpu backend, with each
backend op timed (GEMMs by weight: QKV, O, gate-up, down, LM head), the rest of the step (Python,
scheduler, sampling, embedding) as "other".

    python benchmarks/decode_split.py [--model PATH] [--quantization auto|gguf|gguf_a16|none]
        [--new-tokens 128] [--prompts 2]

Timing wraps every op call with ``time.perf_counter`` (the cpu backend is synchronous), which adds
about a microsecond per call; "other" includes that.
"""

from __future__ import annotations

import argparse
import collections
import time

from portable_xy import LLM, SamplingParams
from portable_xy.engine_args import add_engine_args, engine_kwargs

OPS = ("rms_norm", "rope", "store_kv", "attention", "silu_and_mul")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap, backend="cpu", dtype="bfloat16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=2)
    args = ap.parse_args()
    llm = LLM(**engine_kwargs(args))
    runner = llm.engine.runner
    model, be = runner.model, runner.backend
    names = {}
    for layer in model.layers:
        for kind in ("qkv", "o_proj", "gate_up", "down"):
            names[id(getattr(layer, kind))] = kind
    names[id(model.lm_head)] = "lm_head"
    spent: collections.Counter = collections.Counter()

    def timed(label_of, fn):
        def call(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            spent[label_of(*a)] += time.perf_counter() - t0
            return out

        return call

    be.linear = timed(lambda x, w, *r: "gemm " + names.get(id(w), "?"), be.linear)
    for op in OPS:
        setattr(be, op, timed(lambda *a, op=op: op, getattr(be, op)))
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    msgs = [
        [{"role": "user", "content": f"Write a detailed essay about topic number {i}."}] for i in range(args.prompts)
    ]
    llm.chat(msgs[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    spent.clear()
    steps = 0
    t0 = time.perf_counter()
    for m in msgs:  # one request at a time: every step after the first is a single-row decode
        llm.chat([m], params, use_tqdm=False)
        steps += args.new_tokens
    wall = time.perf_counter() - t0
    per = 1e3 / steps
    print(f"quantization={runner.config.quantization}, dtype={args.dtype}: {steps / wall:.1f} tok/s, "
          f"{wall * per:.2f} ms per token (prefill included)")  # fmt: skip
    for label, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<16}{s * per:8.3f} ms  {100 * s / wall:5.1f}%")
    other = wall - sum(spent.values())
    print(f"  {'other':<16}{other * per:8.3f} ms  {100 * other / wall:5.1f}%")


if __name__ == "__main__":
    main()
