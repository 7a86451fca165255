"""Latency metrics and goodput of one simulated run.

TTFT = first token time - arrival; TBT = every gap between a request's consecutive tokens. A
request is *good* when it completed, its TTFT <= the TTFT target and **every** one of its TBT gaps
<= the TBT target (its max TBT, not a percentile). A request without tokens (a livelocked run) has
an infinite TTFT; a percentile that is infinite is reported as None. Goodput = offered rate x the
fraction of requests that are good (requests/s served within the SLO). Throughput = completed
requests / simulated makespan, which includes draining the last requests, so on a finite trace it
reads below the offered rate even when the system keeps up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .simulate import SimResult


@dataclass(frozen=True)
class Slo:
    ttft: float  # seconds
    tbt: float  # seconds


def ttfts(res: SimResult) -> np.ndarray:
    return np.array([t[0] - r.arrival if t else np.inf for r, t in zip(res.requests, res.token_times)])


def tbt_gaps(res: SimResult) -> np.ndarray:
    """Every inter-token gap of every request, concatenated."""
    gaps = [np.diff(t) for t in res.token_times if len(t) > 1]
    return np.concatenate(gaps) if gaps else np.zeros(0)


def max_tbts(res: SimResult) -> np.ndarray:
    """Per request: its largest inter-token gap (0 for a one-token output)."""
    return np.array([float(np.max(np.diff(t))) if len(t) > 1 else 0.0 for t in res.token_times])


def completion_rate(res: SimResult) -> float:
    """Requests/s completed between the 10th and the 90th percentile completion (the steady state of
    a run that starts with a backlog, without its ramp-up and its tail)."""
    ends = sorted(t[-1] for t in res.token_times if t)
    lo, hi = len(ends) // 10, len(ends) - 1 - len(ends) // 10
    if hi <= lo or ends[hi] <= ends[lo]:
        return len(ends) / res.end_time
    return (hi - lo) / (ends[hi] - ends[lo])


def summarize(res: SimResult, rate: float, slo: Slo) -> dict:
    """One row of the report: throughput, TTFT / TBT percentiles (ms), SLO attainment and goodput
    (``rate``: the offered request rate, recorded as is)."""
    ttft, gaps, worst = ttfts(res), tbt_gaps(res), max_tbts(res)
    done = np.array([len(t) == r.output_len for r, t in zip(res.requests, res.token_times)])
    good = done & (ttft <= slo.ttft) & (worst <= slo.tbt)
    n_out = sum(len(t) for t in res.token_times)

    def ms(a: np.ndarray, q: float) -> float | None:
        with np.errstate(invalid="ignore"):  # inf - inf interpolating between infinite TTFTs
            v = float(np.percentile(a, q)) if a.size else 0.0
        return round(v * 1e3, 2) if np.isfinite(v) else None

    return {
        "model": res.config.model,
        "device": res.config.device.name,
        "policy": res.config.policy,
        "rate": rate,
        "requests": len(res.requests),
        "completed": int(done.sum()),
        "livelock": res.livelock,
        "steps": res.steps,
        "makespan_s": round(res.end_time, 3),
        "throughput_rps": round(int(done.sum()) / res.end_time, 3),
        "output_tps": round(n_out / res.end_time, 2),
        "mean_step_ms": round(res.busy_time / res.steps * 1e3, 3),
        "mean_step_tokens": round(res.scheduled_tokens / res.steps, 1),
        "preemptions": res.preemptions,
        "ttft_p50_ms": ms(ttft, 50),
        "ttft_p99_ms": ms(ttft, 99),
        "tbt_p50_ms": ms(gaps, 50),
        "tbt_p99_ms": ms(gaps, 99),
        "tbt_max_ms": ms(gaps, 100),
        "slo_attainment": round(float(good.mean()), 4),
        "goodput_rps": round(float(good.mean()) * rate, 3),
    }
