"""``portable-xy bench serve``: drive any OpenAI-compatible server (this one, vLLM's, ...) the way
vLLM's serving benchmark does, and report throughput, latencies and goodput.

Requests: ``--dataset FILE.jsonl`` (one ``{"prompt": str}`` or ``{"messages": [...]}`` per line,
optional ``"output_len"``), or synthetic chat prompts (``--num-prompts``; a topic per prompt).
Every request streams (``stream_options.include_usage``), greedy unless ``--temperature``, with
``--output-len`` tokens (``ignore_eos`` by default, so that every engine does the same work).

Arrivals: ``--request-rate R`` requests/s, exponential gaps (Poisson) or gamma with
``--burstiness`` (1 = Poisson, lower = burstier), or ``inf`` for one burst; ``--max-concurrency``
caps requests in flight. Metrics (seconds; p50 / p90 / p99 and mean):

* TTFT: request start to its first content chunk; ITL: gaps between content chunks; TPOT:
  (last chunk - first chunk) / (output tokens - 1); E2E: start to the end of the stream;
* request throughput, output tok/s (from the usage chunk), total tok/s;
* goodput: requests/s that met the SLO (``--slo-ttft-ms`` and ``--slo-itl-ms``, every gap).

Output: a JSON report (``--out``), a PNG of the TTFT and ITL distributions (``--plot``), and a
progress bar.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...distributed.executor import free_port

SCHEMA = "portable_xy.bench.serve"
TOPICS = ["the printing press", "transistors", "the sky's colour", "chess", "photosynthesis", "the water cycle",
          "vaccines", "the Roman Empire", "black holes", "stock markets", "machine learning", "plate tectonics",
          "airplanes", "the human heart", "renewable energy", "volcanoes"]  # fmt: skip


@dataclass
class BenchRequest:
    messages: list[dict[str, str]] | None
    prompt: str | None
    output_len: int


@dataclass
class Result:
    ok: bool
    start: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


def start_server(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300.0, capture: bool = False
) -> tuple[subprocess.Popen, str]:
    """Start an OpenAI-compatible server, ``cmd`` plus ``--host 127.0.0.1 --port PORT`` on a free
    port, and wait until its ``/health`` answers 200; returns ``(process, base URL)``. A server that
    exits first, or is not up within ``timeout`` seconds, raises ``RuntimeError`` (with its output
    when ``capture``)."""
    import httpx

    port = free_port()
    out, err = (subprocess.PIPE, subprocess.STDOUT) if capture else (subprocess.DEVNULL, subprocess.DEVNULL)
    proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], env={**os.environ, **(env or {})},
                            stdout=out, stderr=err, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            said = f": {proc.stdout.read()}" if capture else ""
            raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}{said}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"{cmd[:4]} did not answer /health within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_command(model: str | None, *flags: str) -> list[str]:
    """``portable-xy serve [MODEL] FLAGS...`` run by this Python."""
    return [sys.executable, "-m", "portable_xy.cli", "serve", *([model] if model else []), *flags]


def load_requests(args: argparse.Namespace) -> list[BenchRequest]:
    if args.dataset:
        out = []
        for line in Path(args.dataset).read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                out.append(BenchRequest(d.get("messages"), d.get("prompt"), int(d.get("output_len", args.output_len))))
        return out[: args.num_prompts] if args.num_prompts else out
    rng = random.Random(args.seed)
    return [
        BenchRequest([{"role": "user", "content": f"Write a detailed essay about {rng.choice(TOPICS)}. (#{i})"}],
                     None, args.output_len)  # fmt: skip
        for i in range(args.num_prompts)
    ]


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds before each request: 0 for a burst (``rate`` = inf), else gamma(burstiness) gaps
    with mean 1 / rate (exponential, i.e. Poisson arrivals, at burstiness 1)."""
    if rate == float("inf"):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return list(rng.gamma(burstiness, 1.0 / (rate * burstiness), n))


async def send(client, args: argparse.Namespace, req: BenchRequest) -> Result:
    body: dict[str, Any] = {"model": args.model, "max_tokens": req.output_len, "temperature": args.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if args.ignore_eos:
        body["ignore_eos"] = True
    if req.messages is not None and args.endpoint.endswith("chat/completions"):
        body["messages"] = req.messages
    else:
        body["prompt"] = req.prompt if req.prompt is not None else req.messages[-1]["content"]
    res = Result(ok=False, start=time.perf_counter())
    last = None
    try:
        async with client.stream("POST", args.endpoint, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                for c in chunk.get("choices") or []:
                    text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - res.start
                        else:
                            res.itls.append(now - last)
                        last = now
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - res.start
    res.ok = res.ttft is not None
    return res


async def run_benchmark(args: argparse.Namespace, reqs: list[BenchRequest]) -> tuple[list[Result], float]:
    import httpx
    from tqdm.auto import tqdm

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    gate = asyncio.Semaphore(args.max_concurrency or len(reqs) or 1)
    bar = tqdm(total=len(reqs), desc="requests", disable=not args.progress, dynamic_ncols=True)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=httpx.Timeout(None), limits=limits,
                                 headers=headers) as client:  # fmt: skip

        async def one(req: BenchRequest) -> Result:
            async with gate:
                res = await send(client, args, req)
            bar.update(1)
            return res

        tasks = []
        t0 = time.perf_counter()
        for req, gap in zip(reqs, arrival_gaps(len(reqs), args.request_rate, args.burstiness, args.seed)):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    bar.close()
    return results, duration


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(xs)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}  # fmt: skip


def summarize(results: list[Result], duration: float, slo_ttft_ms: float | None, slo_itl_ms: float | None):
    ok = [r for r in results if r.ok]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    good = [
        r for r in ok
        if (slo_ttft_ms is None or r.ttft * 1e3 <= slo_ttft_ms)
        and (slo_itl_ms is None or all(g * 1e3 <= slo_itl_ms for g in r.itls))
    ]  # fmt: skip
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:10],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tok_s": out_tokens / duration,
        "total_tok_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "goodput_req_s": len(good) / duration,
        "slo": {"ttft_ms": slo_ttft_ms, "itl_ms": slo_itl_ms, "attainment": len(good) / len(results) if results
                else 0.0},  # fmt: skip
        "ttft_s": _stats([r.ttft for r in ok]),
        "tpot_s": _stats(tpots),
        "itl_s": _stats([g for r in ok for g in r.itls]),
        "e2e_s": _stats([r.e2e for r in ok]),
    }


def plot(results: list[Result], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, xs) in zip(axes, (("TTFT", [r.ttft for r in results if r.ok]),
                                     ("ITL", [g for r in results if r.ok for g in r.itls]))):  # fmt: skip
        xs = np.sort(np.asarray(xs) * 1e3)
        if xs.size:
            ax.plot(xs, np.arange(1, xs.size + 1) / xs.size)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction")
        ax.grid(alpha=0.3)
        ax.set_title(f"{name} CDF")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print(report: dict[str, Any]) -> None:
    s = report["summary"]
    print(f"completed {s['completed']} / failed {s['failed']} in {s['duration_s']:.2f} s: "
          f"{s['request_throughput']:.2f} req/s, {s['output_tok_s']:.1f} output tok/s, "
          f"goodput {s['goodput_req_s']:.2f} req/s ({s['slo']['attainment']:.0%} met the SLO)")  # fmt: skip
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        v = s[key]
        if v["p50"] is not None:
            print(f"  {key[:-2].upper():<5} ms: mean {v['mean'] * 1e3:8.1f}  p50 {v['p50'] * 1e3:8.1f}  "
                  f"p90 {v['p90'] * 1e3:8.1f}  p99 {v['p99'] * 1e3:8.1f}")  # fmt: skip
    for e in s["errors"]:
        print(f"  error: {e}")


def _run_cli(args: argparse.Namespace) -> int:
    if args.model is None:
        import httpx

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        args.model = httpx.get(args.base_url + "/v1/models", headers=headers).json()["data"][0]["id"]
    reqs = load_requests(args)
    results, duration = asyncio.run(run_benchmark(args, reqs))
    report = {"schema": SCHEMA, "schema_version": 1, "base_url": args.base_url, "endpoint": args.endpoint,
              "model": args.model, "num_requests": len(reqs), "request_rate": args.request_rate,
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "output_len": args.output_len,
              "summary": summarize(results, duration, args.slo_ttft_ms, args.slo_itl_ms),
              "requests": [asdict(r) for r in results]}  # fmt: skip
    _print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot, f"{args.model} @ {args.request_rate} req/s, {len(reqs)} requests")
    return 0 if report["summary"]["failed"] == 0 else 1


def add_serve_bench_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="drive an OpenAI-compatible server: throughput, TTFT/ITL, goodput",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/chat/completions", choices=["/v1/chat/completions", "/v1/completions"])
    p.add_argument("--model", default=None, help="model name in the API (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", default=None, help="JSONL of {prompt | messages, [output_len]}")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: one burst)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-itl-ms", type=float, default=None)
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--plot", default=None, help="write a PNG of the TTFT / ITL CDFs here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=_run_cli)
    return p
