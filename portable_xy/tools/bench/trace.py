"""Request traces for the step simulator: seeded synthetic Poisson traces with lognormal prompt /
output lengths (the ``conversation`` and ``coding`` mixes of :data:`.shapes.LENGTH_MIXES`), or a
JSONL file with one ``{"arrival": s, "prompt_len": n, "output_len": n}`` object per line."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from .shapes import LENGTH_MIXES

# synthetic lengths are clipped so every request fits Llama-2-7B's 4096-token context
MAX_OUTPUT = 1024
MAX_TOTAL = 4096


@dataclass(frozen=True)
class Request:
    arrival: float  # seconds from the start of the trace
    prompt_len: int
    output_len: int


def synthetic_trace(mix: str, rate: float, num_requests: int, seed: int = 0) -> list[Request]:
    """``num_requests`` Poisson arrivals at ``rate`` requests/s with lengths drawn from ``mix``."""
    if mix not in LENGTH_MIXES:
        raise ValueError(f"unknown mix {mix!r}; choose from {list(LENGTH_MIXES)}")
    if rate <= 0 or num_requests < 1:
        raise ValueError(f"need rate > 0 and num_requests >= 1, got {rate}, {num_requests}")
    rng = random.Random(seed)
    (p_med, p_sig), (o_med, o_sig) = LENGTH_MIXES[mix]["prompt"], LENGTH_MIXES[mix]["output"]
    t, reqs = 0.0, []
    for _ in range(num_requests):
        t += rng.expovariate(rate)
        out = min(MAX_OUTPUT, max(1, round(rng.lognormvariate(math.log(o_med), o_sig))))
        prompt = min(MAX_TOTAL - out, max(1, round(rng.lognormvariate(math.log(p_med), p_sig))))
        reqs.append(Request(t, prompt, out))
    return reqs


def load_trace(path: str | Path) -> list[Request]:
    """Requests of a JSONL trace, sorted by arrival."""
    reqs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            req = Request(float(obj["arrival"]), int(obj["prompt_len"]), int(obj["output_len"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected arrival, prompt_len, output_len ({e})") from e
        if req.arrival < 0 or req.prompt_len < 1 or req.output_len < 1:
            raise ValueError(f"{path}:{n}: need arrival >= 0, prompt_len >= 1, output_len >= 1")
        reqs.append(req)
    if not reqs:
        raise ValueError(f"{path}: no requests")
    return sorted(reqs, key=lambda r: r.arrival)


def mean_rate(reqs: list[Request]) -> float:
    """Arrivals per second over the trace (requests after the first over the span they arrive in)."""
    span = reqs[-1].arrival - reqs[0].arrival
    return (len(reqs) - 1) / span if span > 0 else math.inf


def rescale(reqs: list[Request], rate: float) -> list[Request]:
    """The same requests with arrival times stretched so the trace's mean rate is ``rate``."""
    native = mean_rate(reqs)
    if not math.isfinite(native):
        return list(reqs)
    f = native / rate
    return [Request(r.arrival * f, r.prompt_len, r.output_len) for r in reqs]
