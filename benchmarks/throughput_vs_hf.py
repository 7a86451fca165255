"""Throughput of portable_xy vs HF transformers on the same model, prompts and output lengths,
measured side by side in one run (ratios, not absolute numbers, are the result).

    python benchmarks/throughput_vs_hf.py [--model PATH] [--batch 32] [--new-tokens 128]
        [--dtypes float32 bfloat16] [--rounds 3] [--skip-hf] [--baseline DIR]

Each configuration generates exactly ``--new-tokens`` tokens per request (greedy, EOS ignored):
a single request, then ``--batch`` requests at once. HF runs fp32 ``generate`` (left-padded batch)
in this process; each portable_xy engine (one per ``--dtypes`` entry) runs in a worker process of
its own, so that every engine runs alone with the same memory and threads. All engines are loaded
first, then run in ``--rounds`` interleaved rounds (each round runs every engine once, in reverse
order every other round), so that a slow spell on a shared machine hits all of them; the ratio
reported is the median over rounds of the ratio measured within a round.

``--baseline DIR`` adds the same engines from another build of portable_xy (e.g. an earlier commit,
installed with ``pip install --no-deps --target DIR <checkout>``) and prints this build's ratios to
it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from portable_xy.engine_args import add_engine_args, engine_kwargs
from portable_xy.models.loader import load_tokenizer, resolve_model_path

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


# A portable_xy engine in a worker: the build importable from sys.argv[1] ("-": this checkout's), the
# LLM keywords as JSON in sys.argv[2].
# One JSON request per line on stdin ({"prompts", "new_tokens"}), one tokens/s per line on stdout.
WORKER = """
import json, sys
if sys.argv[1] != "-":
    sys.path.insert(0, sys.argv[1])
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
import time
from portable_xy import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[2]))
print("READY", sys.modules["portable_xy"].__file__, flush=True)
for line in sys.stdin:
    req = json.loads(line)
    params = SamplingParams(temperature=0, max_tokens=req["new_tokens"], ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in req["prompts"]], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == req["new_tokens"] for o in outs)
    print(len(req["prompts"]) * req["new_tokens"] / dt, flush=True)
"""


def start_engine(site: str | None, kwargs: dict):
    """``run(prompts, new_tokens) -> tok/s`` on a worker running ``LLM(**kwargs)`` of the portable_xy
    build in ``site``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, site or "-", json.dumps(kwargs)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    ready = proc.stdout.readline()
    dtype = kwargs["dtype"]
    if not ready.startswith("READY"):
        raise RuntimeError(f"portable_xy worker ({site or 'this checkout'}, {dtype}) failed to start")
    print(f"{dtype} engine from {ready.split(maxsplit=1)[1].strip()}")

    def run(prompts: list[list[int]], new_tokens: int) -> float:
        proc.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
        proc.stdin.flush()
        return float(proc.stdout.readline())

    run([[1, 2, 3]] * 2, 4)  # warm-up
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap, backend="cpu", enable_prefix_caching=False)  # --dtypes: one engine per dtype
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--baseline", metavar="DIR", help="another portable_xy build to compare with (see above)")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    prompts = make_prompts(tokenizer, args.batch)
    runners: dict[str, object] = {}
    for site, label in [(None, "portable_xy"), *([(args.baseline, "baseline")] if args.baseline else [])]:
        for dtype in args.dtypes:
            run = start_engine(site, engine_kwargs(args, dtype=dtype))
            runners[f"{label} {dtype}"] = lambda ps, run=run: run(ps, args.new_tokens)
    hf_name = "HF transformers float32"
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        kw = {"gguf_file": path.name} if path.is_file() else {}
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent if path.is_file() else path), dtype=torch.float32, **kw
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        run_hf(hf, prompts[:1], 4, pad)  # warm-up
        runners[hf_name] = lambda ps: run_hf(hf, ps, args.new_tokens, pad)
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))  # no engine always runs first
        rounds.append({name: {"single": runners[name](prompts[:1]), "batch": runners[name](prompts)} for name in order})
        got = ", ".join(f"{n} {rounds[-1][n]['single']:.1f} / {rounds[-1][n]['batch']:.1f}" for n in runners)
        print(f"round {r + 1} (tok/s, single / batch): {got}")
    print(f"\n{'engine (median of rounds)':<28}{'1 request tok/s':>18}{f'{args.batch} requests tok/s':>22}")
    for name in runners:
        single = statistics.median(x[name]["single"] for x in rounds)
        batch = statistics.median(x[name]["batch"] for x in rounds)
        print(f"{name:<28}{single:>18.1f}{batch:>22.1f}")
    comparisons = [(hf_name, name) for name in runners if name != hf_name]
    comparisons += [(f"baseline {dtype}", f"portable_xy {dtype}") for dtype in args.dtypes]
    for ref, name in comparisons:
        if ref in runners:
            print(f"\n{name} / {ref} (median over rounds of the ratio within a round; min-max):", end="")
            for kind in ("single", "batch"):
                ratios = [x[name][kind] / x[ref][kind] for x in rounds]
                print(f" {kind} {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", end="")
            print()


if __name__ == "__main__":
    main()
