"""``portable-xy bench e2e``: offline serving throughput and latency through ``portable_xy.LLM``,
optionally against HF transformers and vLLM on the same requests in the same run.

Workload: ``--num-requests`` requests whose prompt and output lengths are lognormal around
``--input-len`` / ``--output-len`` (``--sigma``, ``--seed``; random token ids), or a JSONL file
(``--prompts``) with one ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}`` per line and an
optional ``"output_len"``. Every request generates exactly its output length (greedy, EOS ignored).

Metrics per engine: wall time, output / total tokens per second, requests per second, and p50 /
p99 of TTFT, time per output token (TPOT: mean gap after the first token) and request latency.
``ours``: all requests submitted at once (one ``generate`` call), times from the engine's request
metrics. ``hf``: ``model.generate`` one request at a time (HF has no continuous batching), TTFT
and TPOT from a streamer, measured from each request's own start; fp32 on CPU, the engine's dtype
on CUDA. ``vllm`` (when installed): one
``generate`` call; latencies where its outputs carry metrics. Ratios: ours over the others
(throughput) and the others over ours (latencies), so > 1 means ours is better.

Report schema (``schema_version`` 1): ``{schema: "portable_xy.bench.e2e", schema_version, created,
env: {backend, device, torch, transformers, model, dtype}, workload: {source, num_requests,
input_len, output_len, sigma, seed, input_tokens, output_tokens}, engines: {name: metrics |
{skipped: reason}}, ratios: {name: {output_tok_s, ttft_p50, tpot_p50}}}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA = "portable_xy.bench.e2e"
SCHEMA_VERSION = 1


@dataclass
class Request:
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class Timing:
    """One finished request: seconds from its arrival to the first and the last token."""

    ttft: float
    latency: float
    output_len: int

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


def synthetic_workload(
    n: int, input_len: int, output_len: int, sigma: float, seed: int, vocab: int, max_len: int
) -> list[Request]:
    """``n`` requests, lengths lognormal around the medians (clipped so prompt + output <= ``max_len``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ol = min(max(1, round(rng.lognormvariate(math.log(output_len), sigma))), max_len - 1)
        il = min(max(1, round(rng.lognormvariate(math.log(input_len), sigma))), max_len - ol)
        out.append(Request([rng.randrange(3, vocab) for _ in range(il)], ol))
    return out


def jsonl_workload(path: str, tokenizer, output_len: int, max_len: int) -> list[Request]:
    """Requests from a JSONL file (see the module doc); text prompts need ``tokenizer``."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        ids = rec.get("prompt_token_ids")
        if ids is None:
            if tokenizer is None:
                raise ValueError(f"{path}: text prompts need the model's tokenizer")
            ids = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
        ol = min(int(rec.get("output_len", output_len)), max_len - 1)
        out.append(Request(list(ids)[: max_len - ol], ol))
    return out


def summarize(timings: list[Timing], wall: float, input_tokens: int) -> dict[str, Any]:
    """Throughput and p50 / p99 latencies of one engine's run."""
    out_tokens = sum(t.output_len for t in timings)
    m: dict[str, Any] = {
        "num_requests": len(timings),
        "wall_s": wall,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall,
        "total_tok_s": (out_tokens + input_tokens) / wall,
        "req_s": len(timings) / wall,
    }
    for name, vals in (("ttft", [t.ttft for t in timings]), ("tpot", [t.tpot for t in timings]),
                       ("latency", [t.latency for t in timings])):  # fmt: skip
        vals = [v for v in vals if v is not None]
        for q in (50, 99):
            m[f"{name}_p{q}"] = float(np.percentile(vals, q)) if vals else None
    return m


def run_ours(llm, reqs: list[Request]) -> dict[str, Any]:
    from ... import SamplingParams

    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0) for r in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    timings = []
    for o, r in zip(outs, reqs):
        n = len(o.outputs[0].token_ids)
        if n != r.output_len:
            raise RuntimeError(f"request {o.request_id}: {n} tokens, expected {r.output_len}")
        m = o.metrics
        timings.append(Timing(m.first_token_time - m.arrival_time, m.last_token_time - m.arrival_time, n))
    return summarize(timings, wall, sum(len(r.prompt_token_ids) for r in reqs))


def run_hf(model_dir: str, reqs: list[Request], dtype: torch.dtype, device: str = "cpu") -> dict[str, Any]:
    """HF transformers ``generate``, one request at a time, timed with a streamer."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:  # first call: the prompt; then one per new token
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    timings = []
    t_all = time.perf_counter()
    with torch.inference_mode():
        for r in reqs:
            ids = torch.tensor([r.prompt_token_ids], device=device)
            clock = Clock()
            t0 = time.perf_counter()
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=r.output_len, min_new_tokens=r.output_len,
                do_sample=False, pad_token_id=0, streamer=clock,
            )  # fmt: skip
            n = out.shape[1] - ids.shape[1]
            timings.append(Timing(clock.times[1] - t0, clock.times[-1] - t0, n))
    return summarize(timings, time.perf_counter() - t_all, sum(len(r.prompt_token_ids) for r in reqs))


def run_vllm(model: str, reqs: list[Request], dtype: str) -> dict[str, Any]:
    """vLLM's offline ``LLM.generate`` on the same requests (raises ImportError without vLLM)."""
    import vllm

    llm = vllm.LLM(model=model, dtype=dtype, seed=0)
    params = [vllm.SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0) for r in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    timings = []
    for o in outs:
        m, n = getattr(o, "metrics", None), len(o.outputs[0].token_ids)
        if m is None or getattr(m, "first_token_time", None) is None:  # no per-request metrics: throughput only
            timings.append(Timing(math.nan, math.nan, n))
        else:
            timings.append(Timing(m.first_token_time - m.arrival_time, m.last_token_time - m.arrival_time, n))
    res = summarize(timings, wall, sum(len(r.prompt_token_ids) for r in reqs))
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}


def ratios(engines: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Ours vs each other engine: throughput ours / theirs, latencies theirs / ours (> 1: ours better)."""
    ours = engines["ours"]

    def div(a, b):
        return a / b if a is not None and b else None

    return {
        name: {
            "output_tok_s": div(ours["output_tok_s"], m["output_tok_s"]),
            "ttft_p50": div(m["ttft_p50"], ours["ttft_p50"]),
            "tpot_p50": div(m["tpot_p50"], ours["tpot_p50"]),
        }
        for name, m in engines.items()
        if name != "ours" and "skipped" not in m
    }


def run_e2e(
    model: str,
    backend: str = "auto",
    dtype: str = "auto",
    num_requests: int = 32,
    input_len: int = 256,
    output_len: int = 128,
    sigma: float = 0.5,
    seed: int = 0,
    prompts: str | None = None,
    max_model_len: int | None = None,
    compare_hf: bool = False,
    compare_vllm: bool = False,
    log=print,
    engine_kwargs: dict | None = None,
) -> dict:
    """Run the workload through ``portable_xy.LLM`` (and HF / vLLM when asked); returns the report.
    ``engine_kwargs``: more ``LLM`` keywords (e.g. ``skip_tokenizer_init`` for a model without one)."""
    from ... import LLM

    llm = LLM(model=model, backend=backend, dtype=dtype, max_model_len=max_model_len, **(engine_kwargs or {}))
    max_len = llm.max_model_len
    if prompts:
        reqs = jsonl_workload(prompts, llm.tokenizer, output_len, max_len)
    else:
        reqs = synthetic_workload(
            num_requests, input_len, output_len, sigma, seed, llm.model_config.vocab_size, max_len
        )
    engines: dict[str, dict] = {"ours": run_ours(llm, reqs)}
    if compare_hf:
        on_device = llm.backend.platform.hf_on_device
        dev = llm.backend.device.type if on_device else "cpu"
        if model and Path(model).is_dir():
            hf_dtype = llm.dtype if on_device else torch.float32
            engines["hf"] = run_hf(model, reqs, hf_dtype, dev)
        else:
            engines["hf"] = {"skipped": "HF transformers needs an HF model directory"}
    if compare_vllm and model is None:
        engines["vllm"] = {"skipped": "vLLM needs an explicit --model"}
    elif compare_vllm:
        try:
            engines["vllm"] = run_vllm(model, reqs, str(llm.dtype).removeprefix("torch."))
        except ImportError as e:
            engines["vllm"] = {"skipped": f"vLLM is not installed ({e})"}
    import transformers

    report = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env": {
            "backend": llm.backend.name,
            "device": str(llm.backend.device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "model": str(model),
            "dtype": str(llm.dtype).removeprefix("torch."),
        },  # fmt: skip
        "workload": {
            "source": prompts or "synthetic",
            "num_requests": len(reqs),
            "input_len": input_len,
            "output_len": output_len,
            "sigma": sigma,
            "seed": seed,
            "input_tokens": sum(len(r.prompt_token_ids) for r in reqs),
            "output_tokens": sum(r.output_len for r in reqs),
        },  # fmt: skip
        "engines": engines,
        "ratios": ratios(engines),
    }
    for name, m in engines.items():
        if "skipped" in m:
            log(f"{name:5s} skipped: {m['skipped']}")
            continue
        lat = "  ".join(f"{k} {m[k] * 1e3:.1f} ms" for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99") if m[k])
        log(f"{name:5s} {m['output_tok_s']:9.1f} out tok/s  {m['req_s']:7.2f} req/s  {lat}")
    for name, r in report["ratios"].items():
        log(f"ours vs {name}: " + "  ".join(f"{k} {v:.2f}x" for k, v in r.items() if v is not None))
    return report


def _run_cli(args: argparse.Namespace) -> int:
    report = run_e2e(
        args.model, args.backend, args.dtype, args.num_requests, args.input_len, args.output_len, args.sigma,
        args.seed, args.prompts, args.max_model_len, args.compare_hf, args.compare_vllm,
    )  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def add_e2e_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("e2e", help="offline throughput / TTFT / TPOT through LLM (vs HF, vLLM)")
    p.add_argument("--model", default=None, help="HF model directory or .gguf (default: SmolLM2)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, default=256, help="median prompt length (synthetic workload)")
    p.add_argument("--output-len", type=int, default=128, help="median output length")
    p.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma of both lengths (0: fixed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", help="JSONL of {prompt | prompt_token_ids, [output_len]} instead of synthetic")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--compare-hf", action="store_true", help="also run HF transformers generate")
    p.add_argument("--compare-vllm", action="store_true", help="also run vLLM (skipped when not installed)")
    p.add_argument("--out", help="write the JSON report here")
    p.set_defaults(func=_run_cli)
    return p
