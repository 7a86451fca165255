"""portable_xy against llama.cpp on the same GGUF, prompts and output lengths, side by side in one
run: tokens/s and memory (ratios within a round are the result; these machines are noisy).

    python benchmarks/vs_llamacpp.py [--model FILE.gguf] [--llama-python PY] [--new-tokens 128]
        [--single 4] [--batch 32] [--rounds 3]

Engines, each in a worker process of its own (so each runs alone, with the same threads, and its
memory is its own):
    portable_xy            ``LLM(model)``: the defaults (``quantization="auto"``: GGUF blocks kept)
    portable_xy bf16       ``LLM(model, quantization=None)``: every weight dequantized to bf16
    llama.cpp              ``llama_cpp.Llama(model, n_threads=<this process's CPU count>)``, from a
                           Python that has ``llama-cpp-python`` (``--llama-python``; built from
                           source with ``CMAKE_ARGS=-DGGML_NATIVE=ON``)
Every request is a chat prompt (the model's template, tokenized once here and sent as token ids to
all engines), greedy, exactly ``--new-tokens`` new tokens (EOS ignored / banned). "single": the
``--single`` prompts one after another; "batch": ``--batch`` prompts at once (portable_xy only:
llama-cpp-python's ``Llama`` serves one sequence). Rounds interleave the engines, in reverse order
every other round. Memory: each worker's peak resident set (``VmHWM``) after loading and its first
single-stream requests, and after its last request.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

from throughput_vs_hf import make_prompts  # this script's folder is on sys.path

from portable_xy.engine_args import add_engine_args, engine_kwargs
from portable_xy.models.loader import load_tokenizer, resolve_model_path

# One JSON request per line on stdin ({"prompts", "new_tokens"}), one JSON reply per line on stdout
# ({"tok_s"}, or {"rss"} when asked); first line "READY". ``run`` returns each request's new-token count.
COMMON = """
import json, sys, time
def peak_rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
def serve(run):
    print("READY", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("rss"):
            print(json.dumps({"rss": peak_rss_mib()}), flush=True)
            continue
        t0 = time.perf_counter()
        counts = run(req["prompts"], req["new_tokens"])
        dt = time.perf_counter() - t0
        assert all(c == req["new_tokens"] for c in counts), counts
        print(json.dumps({"tok_s": sum(counts) / dt}), flush=True)
"""

OURS = """
from portable_xy import LLM, SamplingParams
llm = LLM(**json.loads(sys.argv[1]))
def run(prompts, n):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [len(o.outputs[0].token_ids) for o in outs]
serve(run)
"""

LLAMA = """
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=2048, n_threads=int(sys.argv[2]), n_batch=512, verbose=False)
eos = llm.token_eos()
def run(prompts, n):
    out = []
    for p in prompts:
        llm.reset()  # no prompt reuse from the previous request (portable_xy's prefix cache is on)
        r = llm.create_completion(p, max_tokens=n, temperature=0.0, top_k=1, logit_bias={eos: -1e9})
        out.append(r["usage"]["completion_tokens"])
    return out
serve(run)
"""


class Worker:
    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"{name}: worker failed to start (exit {self.proc.poll()})")

    def ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def find_llama_python(given: str | None) -> str | None:
    for cand in [given, os.environ.get("LLAMA_CPP_PYTHON"), sys.executable]:
        if cand and (shutil.which(cand) or os.path.exists(cand)):
            ok = subprocess.run([cand, "-c", "import llama_cpp"], capture_output=True).returncode == 0
            if ok:
                return cand
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)  # --model: a .gguf file (default: SmolLM2-135M-Instruct Q4_1)
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python (or $LLAMA_CPP_PYTHON)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--single", type=int, default=4, help="prompts run one after another")
    ap.add_argument("--batch", type=int, default=32, help="prompts run at once (0: skip)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    if path.suffix != ".gguf":
        ap.error(f"--model must be a .gguf file, got {path}")
    tok = load_tokenizer(path)
    single = make_prompts(tok, args.single)
    batch = make_prompts(tok, args.batch)
    threads = len(os.sched_getaffinity(0))
    workers = [
        Worker("portable_xy", [sys.executable, "-c", COMMON + OURS, json.dumps(engine_kwargs(args, model=str(path)))]),
        Worker("portable_xy bf16", [sys.executable, "-c", COMMON + OURS,
                                    json.dumps(engine_kwargs(args, model=str(path), quantization=None))]),
    ]
    llama_py = find_llama_python(args.llama_python)
    if llama_py is None:
        print("llama.cpp: no Python with llama_cpp found (--llama-python / $LLAMA_CPP_PYTHON); skipped")
    else:
        workers.append(Worker("llama.cpp", [llama_py, "-c", COMMON + LLAMA, str(path), str(threads)]))
    for w in workers:  # warm-up
        w.ask({"prompts": single[:1], "new_tokens": 4})
    rounds = []
    single_rss: dict[str, float] = {}
    for r in range(args.rounds):
        order = workers if r % 2 == 0 else workers[::-1]
        got: dict[str, dict[str, float]] = {}
        for w in order:
            got[w.name] = {"single": w.ask({"prompts": [single[0]], "new_tokens": args.new_tokens})["tok_s"]}
            if len(single) > 1:  # the rest one by one; tokens/s over all of them
                rates = [got[w.name]["single"]]
                rates += [w.ask({"prompts": [p], "new_tokens": args.new_tokens})["tok_s"] for p in single[1:]]
                got[w.name]["single"] = len(rates) / sum(1 / x for x in rates)
            if r == 0:  # peak memory of loading and single-stream decoding
                single_rss[w.name] = w.ask({"rss": True})["rss"]
            if args.batch and w.name != "llama.cpp":
                got[w.name]["batch"] = w.ask({"prompts": batch, "new_tokens": args.new_tokens})["tok_s"]
        rounds.append(got)
        print(f"round {r + 1}: " + ", ".join(f"{n} " + " / ".join(f"{v:.1f}" for v in got[n].values()) for n in got))
    rss = {w.name: w.ask({"rss": True})["rss"] for w in workers}
    for w in workers:
        w.close()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    amx = "with AMX" if "amx_int8" in lscpu else "no AMX"
    print(f"\n{model_name} ({amx}), {threads} threads; {path.name}; {args.new_tokens} new tokens, greedy")
    print(
        f"{'engine (median of rounds)':<26}{'single tok/s':>14}{f'{args.batch} x batch tok/s':>20}"
        f"{'peak RSS MiB, single / all':>30}"
    )
    for w in workers:
        s = statistics.median(x[w.name]["single"] for x in rounds)
        b = statistics.median(x[w.name]["batch"] for x in rounds) if args.batch and w.name != "llama.cpp" else None
        mem = f"{single_rss[w.name]:.0f} / {rss[w.name]:.0f}"
        print(f"{w.name:<26}{s:>14.1f}{'-' if b is None else f'{b:.1f}':>20}{mem:>30}")

    def ratio(a: str, b: str, kind: str) -> str:
        rs = [x[a][kind] / x[b][kind] for x in rounds]
        return f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})"

    print("\nratios (median over rounds of the ratio within a round; min-max):")
    pairs = [("single", "portable_xy", "portable_xy bf16")]
    if llama_py is not None:
        pairs.insert(0, ("single", "portable_xy", "llama.cpp"))
    if args.batch:
        pairs.append(("batch", "portable_xy", "portable_xy bf16"))
    for kind, a, b in pairs:
        print(f"  {kind + ',':<8}{a} / {b}: {ratio(a, b, kind)}")


if __name__ == "__main__":
    main()
