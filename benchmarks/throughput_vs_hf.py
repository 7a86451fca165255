"""Throughput of portable_xy vs HF transformers on the same model, prompts and output lengths,
measured side by side in one run (ratios, not absolute numbers, are the result).

    python benchmarks/throughput_vs_hf.py [--model PATH] [--batch 32] [--new-tokens 128]
        [--dtypes float32 bfloat16] [--rounds 3] [--skip-hf]

Each configuration generates exactly ``--new-tokens`` tokens per request (greedy, EOS ignored):
a single request, then ``--batch`` requests at once. HF runs fp32 ``generate`` (left-padded batch).
All engines are loaded first, then run in ``--rounds`` interleaved rounds (each round runs every
engine once), so that a slow spell on a shared machine hits all of them; the ratio reported is the
median over rounds of the ratio measured within a round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from portable_xy import LLM, SamplingParams
from portable_xy.models.loader import resolve_model_path

TOPICS = [
    "the history of the printing press", "how a transistor works", "why the sky is blue",
    "the rules of chess", "photosynthesis", "the water cycle", "how vaccines work", "the Roman Empire",
    "black holes", "the stock market", "machine learning", "the French Revolution", "plate tectonics",
    "how airplanes fly", "the human heart", "renewable energy",
]  # fmt: skip


def make_prompts(tokenizer, n: int) -> list[list[int]]:
    prompts = []
    for i in range(n):
        msg = [{"role": "user", "content": f"Write a detailed essay about {TOPICS[i % len(TOPICS)]}. (#{i})"}]
        text = tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def run_hf(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=pad_id,
        )  # fmt: skip
    dt = time.perf_counter() - t0
    assert out.shape[1] - width == new_tokens
    return len(prompts) * new_tokens / dt


def run_ours(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return len(prompts) * new_tokens / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    runners: dict[str, object] = {}
    tokenizer = None
    for dtype in args.dtypes:
        llm = LLM(model=args.model, backend="cpu", dtype=dtype, enable_prefix_caching=False)
        tokenizer = llm.get_tokenizer()
        run_ours(llm, make_prompts(tokenizer, 2), 4)  # warm-up
        runners[f"portable_xy {dtype}"] = lambda ps, llm=llm: run_ours(llm, ps, args.new_tokens)
    prompts = make_prompts(tokenizer, args.batch)
    hf_name = "HF transformers float32"
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        path = resolve_model_path(args.model)
        kw = {"gguf_file": path.name} if path.is_file() else {}
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent if path.is_file() else path), dtype=torch.float32, **kw
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        run_hf(hf, prompts[:1], 4, pad)  # warm-up
        runners[hf_name] = lambda ps: run_hf(hf, ps, args.new_tokens, pad)
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        rounds.append({name: {"single": run(prompts[:1]), "batch": run(prompts)} for name, run in runners.items()})
        got = ", ".join(f"{n} {v['single']:.1f} / {v['batch']:.1f}" for n, v in rounds[-1].items())
        print(f"round {r + 1} (tok/s, single / batch): {got}")
    print(f"\n{'engine (median of rounds)':<28}{'1 request tok/s':>18}{f'{args.batch} requests tok/s':>22}")
    for name in runners:
        single = statistics.median(x[name]["single"] for x in rounds)
        batch = statistics.median(x[name]["batch"] for x in rounds)
        print(f"{name:<28}{single:>18.1f}{batch:>22.1f}")
    if hf_name in runners:
        print("\nratios vs HF transformers (median over rounds of the ratio within a round; min-max):")
        for name in runners:
            if name == hf_name:
                continue
            parts = []
            for kind in ("single", "batch"):
                ratios = [x[name][kind] / x[hf_name][kind] for x in rounds]
                parts.append(f"{kind} {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
            print(f"  {name}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
