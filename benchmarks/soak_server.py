"""Soak test of the OpenAI-compatible server: hundreds of requests from tens of concurrent
clients, mixing streaming and non-streaming chat and completions, clients that cancel mid-stream,
and malformed requests.

    python benchmarks/soak_server.py [--model PATH | --url URL] [--requests 600] [--clients 32]
        [--max-tokens 32] [--seed 0]

Without ``--url`` it starts ``portable-xy serve`` on a free port (and measures its RSS). Passes
when every good request is answered in full (a finish reason; a stream ending in ``[DONE]``),
every malformed one gets its 4xx in OpenAI's error shape, nothing gets a 5xx, and afterwards
``/metrics`` shows no running or waiting request and an empty KV cache; with a local server, its
RSS must stop growing after the warm-up (the first 30% of the requests). Prints the figures
and exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from portable_xy.engine_args import add_engine_args, engine_flags
from portable_xy.tools.bench.serve import serve_command, start_server, stop_server

# malformed requests and the status each must get
BAD = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400),
    ("/v1/completions", {"prompt": 7}, 400),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"prompt": "x", "model": "no-such-model"}, 404),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "top_p": 0}, 400),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400),
    ("/v1/chat/completions", b"{this is not json", 400),
]
TOPICS = ["tiles", "rivers", "compilers", "bread", "the moon", "chess", "bees", "trains", "glass", "rain"]


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)
    ok: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)

    def fail(self, kind: str, why: str) -> None:
        self.failures.append(f"{kind}: {why}")


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _metrics(client: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        m = re.match(r"^(vllm:[a-z0-9_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


async def _stream(client: httpx.AsyncClient, path: str, body: dict, cancel_after: int | None) -> tuple[int, str]:
    """(status, what went wrong or "") of a streaming request; ``cancel_after``: chunks to read
    before going away."""
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return r.status_code, (await r.aread()).decode()[:200]
        chunks, finished, done = 0, False, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return 500, str(chunk["error"])
            chunks += 1
            finished |= any(c.get("finish_reason") for c in chunk.get("choices") or [])
            if cancel_after is not None and chunks >= cancel_after:
                return 200, ""  # leaving the block closes the connection mid-stream
        return 200, "" if (done and finished) else f"stream ended without finish_reason / [DONE] ({chunks} chunks)"


async def one(client: httpx.AsyncClient, rng: random.Random, tally: Tally, max_tokens: int) -> None:
    kind = rng.choices(["stream_chat", "chat", "completion", "stream_completion", "cancel", "bad"],
                       [30, 15, 15, 10, 15, 15])[0]  # fmt: skip
    tally.sent[kind] += 1
    topic = rng.choice(TOPICS)
    n_tok = rng.randint(4, max_tokens)
    try:
        if kind == "bad":
            path, body, want = rng.choice(BAD)
            r = await (client.post(path, content=body, headers={"content-type": "application/json"}) if isinstance(
                body, bytes) else client.post(path, json=body))  # fmt: skip
            tally.statuses[r.status_code] += 1
            err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code != want or set(err) != {"message", "type", "param", "code"}:
                tally.fail(kind, f"{path} {body!r:.60}: HTTP {r.status_code} {r.text[:120]}")
            else:
                tally.ok[kind] += 1
            return
        chat = {"messages": [{"role": "user", "content": f"Tell me about {topic}."}], "max_tokens": n_tok,
                "temperature": rng.choice([0.0, 0.8]), "seed": rng.randint(0, 99)}  # fmt: skip
        comp = {"prompt": f"A note on {topic}:", "max_tokens": n_tok, "n": rng.choice([1, 1, 2]),
                "logprobs": rng.choice([None, 2]), "stop": rng.choice([None, ["\n\n"]])}  # fmt: skip
        if kind in ("stream_chat", "cancel"):
            body = {**chat, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": kind == "cancel",
                    "max_tokens": max_tokens * 4 if kind == "cancel" else n_tok}  # fmt: skip
            status, why = await _stream(client, "/v1/chat/completions", body, rng.randint(1, 5) if kind == "cancel"
                                        else None)  # fmt: skip
        elif kind == "stream_completion":
            status, why = await _stream(client, "/v1/completions", {**comp, "stream": True}, None)
        else:
            path, body = ("/v1/chat/completions", chat) if kind == "chat" else ("/v1/completions", comp)
            r = await client.post(path, json=body)
            status = r.status_code
            choices = r.json().get("choices") if status == 200 else None
            why = "" if choices and all(c.get("finish_reason") for c in choices) else r.text[:200]
        tally.statuses[status] += 1
        if status != 200 or why:
            tally.fail(kind, f"HTTP {status} {why}")
        else:
            tally.ok[kind] += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        tally.fail(kind, f"{type(e).__name__}: {e}")


async def soak(url: str, requests: int, clients: int, max_tokens: int, seed: int, on_tenth=None) -> Tally:
    tally = Tally()
    rng = random.Random(seed)
    gate = asyncio.Semaphore(clients)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as client:

        async def guarded(i: int) -> None:
            async with gate:
                await one(client, random.Random(rng.random()), tally, max_tokens)
            if on_tenth is not None and (i + 1) % max(1, requests // 10) == 0:
                on_tenth()

        await asyncio.gather(*(guarded(i) for i in range(requests)))
    return tally


def run(url: str, requests: int, clients: int, max_tokens: int, seed: int, pid: int | None) -> dict:
    """The soak against ``url`` (a server process ``pid`` for RSS, if local): the report; ``ok``
    says whether it passed."""
    rss: list[float] = [_rss_mib(pid)] if pid else []
    t0 = time.time()
    tally = asyncio.run(soak(url, requests, clients, max_tokens, seed,
                             (lambda: rss.append(_rss_mib(pid))) if pid else None))  # fmt: skip
    wall = time.time() - t0
    with httpx.Client(base_url=url) as c:
        deadline = time.time() + 15
        while True:
            m = _metrics(c)
            idle = m.get("vllm:num_requests_running", 1) == 0 and m.get("vllm:num_requests_waiting", 1) == 0
            if (idle and m.get("vllm:kv_cache_usage_perc", 1) == 0) or time.time() > deadline:
                break
            time.sleep(0.1)
        served = c.get("/health").status_code == 200
    five = sum(v for k, v in tally.statuses.items() if k >= 500)
    # RSS after every tenth of the requests; the first three tenths are the warm-up
    growth = (max(rss[3:]) - rss[3]) if len(rss) > 4 else 0.0
    report = {
        "requests": requests, "clients": clients, "wall_s": round(wall, 1), "sent": dict(tally.sent),
        "answered_as_expected": dict(tally.ok), "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "failures": tally.failures[:20], "num_failures": len(tally.failures), "http_5xx": five,
        "after": {k.split(":")[1]: m.get(k) for k in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                                       "vllm:kv_cache_usage_perc")},
        "still_serving": served, "rss_mib": [round(x, 1) for x in rss], "rss_growth_after_warmup_mib": round(growth, 1),
    }  # fmt: skip
    report["ok"] = (not tally.failures and five == 0 and served and idle and m.get("vllm:kv_cache_usage_perc") == 0
                    and growth <= 64)  # fmt: skip
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="an already running server (no RSS figures)")
    add_engine_args(ap)  # the server's flags; --seed is also the workload's
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(serve_command(args.model, *engine_flags(args)))
    try:
        report = run(url, args.requests, args.clients, args.max_tokens, args.seed, proc.pid if proc else None)
    finally:
        if proc is not None:
            stop_server(proc)
    print(json.dumps(report, indent=1))
    print("PASS" if report["ok"] else "FAIL")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
