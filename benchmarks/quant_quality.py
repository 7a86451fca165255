"""Quality of the quantized-weight modes on a GGUF model, against HF transformers fp32 on the same
GGUF (transformers dequantizes it on load):

- perplexity of a fixed English text (the Python reference manual's "Execution model" and
  "Exceptions" chapters, from the running Python's ``pydoc_data``: a few thousand tokens), scored
  with ``SamplingParams(prompt_logprobs=0)`` in windows of ``--window`` tokens;
- greedy agreement over ``--prompts`` chat prompts x ``--new-tokens`` tokens: prompts whose tokens
  all equal HF's, and the mean length of the common prefix.

    python benchmarks/quant_quality.py [--model FILE.gguf] [--modes gguf gguf_a16 none]
        [--window 1024] [--prompts 16] [--new-tokens 64]

Modes are ``LLM(quantization=...)`` in bf16 (``none``: weights dequantized to bf16), plus
``fp32`` (the exact dequantized path).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from portable_xy import LLM, SamplingParams
from portable_xy.engine_args import add_engine_args, engine_kwargs
from portable_xy.models.loader import load_tokenizer, resolve_model_path

QUESTIONS = [
    "What is the capital of France?", "Explain how a hash table works.", "Write a haiku about autumn.",
    "What causes the seasons on Earth?", "Give three tips for learning a language.", "What is photosynthesis?",
    "Summarise the plot of Romeo and Juliet.", "How does a bicycle stay upright?", "What is a prime number?",
    "Describe the water cycle.", "Why is the sky blue?", "What is machine learning?",
    "How do vaccines work?", "Write a short poem about the sea.", "What is the Pythagorean theorem?",
    "Explain recursion to a child.", "What are black holes?", "How does a refrigerator keep food cold?",
]  # fmt: skip


def fixed_text() -> str:
    from pydoc_data.topics import topics

    return topics["execmodel"] + "\n\n" + topics["exceptions"]


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids) - 1, size) if len(ids[i : i + size]) > 1]


def ppl_ours(llm: LLM, chunks: list[list[int]]) -> float:
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outs = llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=False)
    total, count = 0.0, 0
    for chunk, out in zip(chunks, outs):
        for tok, pos in zip(chunk[1:], out.prompt_logprobs[1:]):
            total += pos[tok].logprob
            count += 1
    return math.exp(-total / count)


@torch.inference_mode()
def ppl_hf(model, chunks: list[list[int]]) -> float:
    total, count = 0.0, 0
    for c in chunks:
        logits = model(torch.tensor([c])).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(c[1:])[:, None])
        total += lp.sum().item()
        count += len(c) - 1
    return math.exp(-total / count)


@torch.inference_mode()
def greedy_hf(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    out = []
    for p in prompts:
        g = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        out.append(g[0, len(p) :].tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)  # --modes sets dtype and quantization per engine
    ap.add_argument("--modes", nargs="+", default=["gguf", "gguf_a16", "none", "fp32"])
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    ids = tok(fixed_text(), add_special_tokens=False)["input_ids"]
    chunks = windows(ids, args.window)
    chats = []
    for q in (QUESTIONS * 2)[: args.prompts]:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        chats.append(tok(text, add_special_tokens=False)["input_ids"])
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ref_ppl = ppl_hf(hf, chunks)
    ref_tokens = greedy_hf(hf, chats, args.new_tokens)
    del hf
    py = ".".join(map(str, sys.version_info[:3]))
    print(f"text: {len(ids)} tokens (Python {py} pydoc 'execmodel' + 'exceptions'), windows of {args.window}")
    print(f"{'engine':<34}{'perplexity':>12}{'vs HF':>9}{'identical':>11}{'mean prefix':>13}")
    print(f"{'HF transformers fp32':<34}{ref_ppl:>12.4f}{'':>9}{'':>11}{'':>13}")
    greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    for mode in args.modes:
        kw = (
            {"dtype": "float32"}
            if mode == "fp32"
            else {"dtype": "bfloat16", "quantization": None if mode == "none" else mode}
        )
        llm = LLM(**engine_kwargs(args, model=str(path), max_model_len=max(2048, args.window + 1), **kw))
        ppl = ppl_ours(llm, chunks)
        outs = llm.generate([{"prompt_token_ids": c} for c in chats], greedy, use_tqdm=False)
        same, prefix = 0, 0
        for o, ref in zip(outs, ref_tokens):
            got = list(o.outputs[0].token_ids)
            same += got == ref
            prefix += next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
        label = f"portable_xy {mode}" + ("" if mode == "fp32" else " (bf16)")
        print(f"{label:<34}{ppl:>12.4f}{100 * (ppl / ref_ppl - 1):>+8.2f}%{f'{same}/{len(chats)}':>11}"
              f"{prefix / len(chats):>13.1f}")  # fmt: skip
        llm.shutdown()


if __name__ == "__main__":
    main()
