"""What tensor parallelism costs on one CPU host: TP=2 against TP=1 output tok/s (single stream
and a batch), the per-step broadcast of the token table, and the all-reduce bytes per token against
the analytic count.

    python benchmarks/tp_cost.py [--rounds 3] [--batch 32] [--output-len 128] [--dtype auto]

The model is a random-weight Llama of about SmolLM2-135M's size whose heads TP=2 divides
(SmolLM2's 9 do not): 30 layers, hidden 512 as 8 heads of 64, 4 KV heads, intermediate 1536, a
tied 49152-token vocabulary; written once under ``--model-dir``. Each TP degree runs in a
process of its own, both loaded first; rounds alternate their order. Greedy, EOS ignored, prefix
caching off. On a 2-core host TP=2 gives each rank one core, so it cannot be faster; the point is
the price of the extra collectives and processes.

Analytic all-reduce bytes per token: (2 x layers + 1) x hidden x dtype bytes (after O and down in
every layer, and after the vocab-parallel embedding lookup).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from portable_xy.engine_args import add_engine_args, engine_kwargs

CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=512,
    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8, num_key_value_heads=4,
    head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)  # fmt: skip

WORKER = """
import json, pickle, sys, time
from portable_xy import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[1]))
runner = llm.engine.runner
tokens = [0]
run = runner.run
def counted(step):
    tokens[0] += len(step.token_ids)
    return run(step)
runner.run = counted
group = runner.group
print("READY", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    prompts = [{"prompt_token_ids": [(37 * i + 11 * j) % 49000 + 100 for j in range(req["prompt_len"])]}
               for i in range(req["n"])]
    sp = SamplingParams(temperature=0, max_tokens=req["output_len"], ignore_eos=True)
    b0 = (group.all_reduce_bytes, group.num_broadcasts, group.broadcast_s, group.all_reduce_s) if group else 0
    t0, steps0 = tokens[0], llm.engine.num_steps
    start = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - start
    out = {"tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / wall, "steps": llm.engine.num_steps - steps0,
           "tokens": tokens[0] - t0, "elem": llm.dtype.itemsize}
    if group:
        out["all_reduce_bytes"] = group.all_reduce_bytes - b0[0]
        out["broadcasts"] = group.num_broadcasts - b0[1]
        out["broadcast_s"] = group.broadcast_s - b0[2]
        out["all_reduce_s"] = group.all_reduce_s - b0[3]
        out["wall_s"] = wall
    print(json.dumps(out), flush=True)
llm.shutdown()
"""


def write_model(path: Path) -> None:
    """The random-weight checkpoint (safetensors), once."""
    if (path / "model.safetensors").is_file():
        return
    import torch
    from safetensors.torch import save_file

    c = CONFIG
    h, i, d, v = c["hidden_size"], c["intermediate_size"], c["head_dim"], c["vocab_size"]
    hq, hkv = c["num_attention_heads"], c["num_key_value_heads"]
    g = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": 0.02 * torch.randn(v, h, generator=g), "model.norm.weight": torch.ones(h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, shape in {
            "self_attn.q_proj.weight": (hq * d, h), "self_attn.k_proj.weight": (hkv * d, h),
            "self_attn.v_proj.weight": (hkv * d, h), "self_attn.o_proj.weight": (h, hq * d),
            "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
        }.items():  # fmt: skip
            state[p + name] = 0.02 * torch.randn(*shape, generator=g)
        state[p + "input_layernorm.weight"] = torch.ones(h)
        state[p + "post_attention_layernorm.weight"] = torch.ones(h)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG))
    save_file({k: t.to(torch.bfloat16) for k, t in state.items()}, str(path / "model.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/portable_xy-tp-bench-model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    add_engine_args(ap, model=False, enable_prefix_caching=False, skip_tokenizer_init=True, max_model_len=1024)
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args()
    model = Path(args.model_dir)
    write_model(model)
    procs = {}
    for tp in (1, 2):
        kw = engine_kwargs(args, model=str(model), tensor_parallel_size=tp)
        procs[tp] = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(kw)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    for tp, p in procs.items():
        if p.stdout.readline().strip() != "READY":
            raise SystemExit(f"the TP={tp} engine did not start")
    results: dict[str, dict[int, list[dict]]] = {"single": {1: [], 2: []}, "batched": {1: [], 2: []}}
    try:
        for r in range(args.rounds):
            for mode, n in (("single", 1), ("batched", args.batch)):
                for tp in (1, 2) if r % 2 == 0 else (2, 1):
                    req = {"n": n, "prompt_len": args.prompt_len, "output_len": args.output_len}
                    procs[tp].stdin.write(json.dumps(req) + "\n")
                    procs[tp].stdin.flush()
                    results[mode][tp].append(json.loads(procs[tp].stdout.readline()))
                    print(f"round {r} {mode} TP={tp}: {results[mode][tp][-1]['tok_s']:.1f} tok/s", flush=True)
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(timeout=60)
    elem = results["single"][2][0]["elem"]
    analytic = (2 * CONFIG["num_hidden_layers"] + 1) * CONFIG["hidden_size"] * elem
    report = {"args": vars(args), "analytic_all_reduce_bytes_per_token": analytic}
    for mode in results:
        one, two = results[mode][1], results[mode][2]
        ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(one, two)]
        bcast = sum(x["broadcast_s"] for x in two) / sum(x["broadcasts"] for x in two)
        per_token = sum(x["all_reduce_bytes"] for x in two) / sum(x["tokens"] for x in two)
        steps = sum(x["steps"] for x in two)
        reduce_ms = sum(x["all_reduce_s"] for x in two) / steps * 1e3
        step_ms = sum(x["wall_s"] for x in two) / steps * 1e3
        report[mode] = {"tp1_tok_s": [round(x["tok_s"], 1) for x in one],
                        "tp2_tok_s": [round(x["tok_s"], 1) for x in two],
                        "tp2_over_tp1_median": round(statistics.median(ratios), 3),
                        "broadcast_ms_per_step": round(bcast * 1e3, 3),
                        "tp2_step_ms": round(step_ms, 2), "tp2_all_reduce_ms_per_step": round(reduce_ms, 2),
                        "all_reduce_bytes_per_token": per_token}  # fmt: skip
        med1, med2 = (statistics.median(x["tok_s"] for x in side) for side in (one, two))
        print(f"{mode}: TP=1 {med1:.1f} tok/s, TP=2 {med2:.1f} tok/s "
              f"(TP=2/TP=1 median {statistics.median(ratios):.2f}x); "
              f"TP=2 step {step_ms:.1f} ms of which all-reduces {reduce_ms:.1f} ms and the broadcast "
              f"{bcast * 1e3:.3f} ms; all-reduce {per_token:.0f} B/token "
              f"(analytic {analytic})")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
