"""``portable-xy bench simulate``: goodput of the token-wise, prefill-first and decode-first
scheduling policies on roofline device models (:mod:`.step_model`), from traces replayed through the
real scheduler (:mod:`.simulate`).

For every profile x model x workload, a saturation run (all requests at t = 0, token-wise policy)
gives the capacity (its steady completion rate, :func:`.sim_metrics.completion_rate`); the request
rates swept are fractions of it (or ``--rates``). Writes ``simulator.json``, ``simulator.md`` and
``img/sim_{goodput,tbt_cdf}_<profile>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ...models.sharding import check_split
from ...scheduler_config import POLICIES
from .shapes import LENGTH_MIXES, MODELS, model_names
from .sim_metrics import Slo, completion_rate, summarize, tbt_gaps
from .simulate import SimConfig, simulate
from .step_model import (
    BW_EFF,
    FLOPS_EFF,
    STEP_OVERHEAD_S,
    DeviceSpec,
    StageShape,
    device_spec,
    load_shipped,
    step_time_parts,
    weight_bytes,
)
from .trace import Request, load_trace, rescale, synthetic_trace

DEFAULT_PROFILES = ("cuda/sm90", "ascend/910b")
LOAD_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # swept rates, as fractions of the capacity
CDF_POINTS = 101  # TBT quantiles kept for the CDF plot (0%, 1%, ..., 100%)

NOTES = """## Reading the results

* **tokenwise** (XY-Serve §4.1): every running decode takes its token first, prefill chunks fill the
  rest of the budget, so no step leaves a decoding request out and a step's time is bounded by one
  full-budget step. **prefill_first**: a step with any prefill work is prefill-only, so decoding
  requests stall for as many steps as the queued prompts need. **decode_first**: prefill runs only
  in a step where nothing decodes, so a new batch is admitted only once the previous one has fully
  drained: arrivals queue behind whole batches and TTFT grows with the trace (its TBT is the best
  of the three because its steps are decode-only).
* A **livelock** is the scheduler cycling through the same states without emitting a token after
  the last arrival; the replay stops there and the requests it never finished count as missing the
  SLO. This simulator found one in the scheduler (prefill-first prefills preempting each other with
  the KV cache full while the decodes holding the blocks never ran); prefill-first prefills no
  longer preempt, and no run here livelocks.
* The capacity is an estimate (token-wise policy, from a burst). Past the true capacity the queue
  grows for as long as requests keep arriving, so on these finite traces the attainment just past
  it is optimistic (the last requests are the ones that miss TTFT, and there are few of them):
  compare the policies at the same rate; every policy sees the same trace at a given rate.

## Limitations

Roofline only: constant efficiency factors (no small-M inefficiency or tile padding, see
[padding.md](padding.md)), no elementwise ops, no launch gaps inside a forward, one constant host
overhead per step; communication as ring all-reduces that never overlap compute; the 910B peaks
and HCCS figures are approximate (see the profiles); no prefix caching and no speculative decoding in the traces;
synthetic lengths with one seed.
"""


@dataclass(frozen=True)
class SweepSpec:
    profiles: list[str]
    models: list[str]
    workloads: list[str]  # LENGTH_MIXES names, or the trace file's stem with ``trace``
    policies: list[str]
    num_requests: int = 300
    seed: int = 0
    rates: list[float] | None = None  # None: LOAD_FRACTIONS of the capacity
    slo: Slo = Slo(ttft=2.0, tbt=0.1)
    budget: int = 2048
    max_num_seqs: int = 256
    kv_cache_gib: float | None = 40.0  # per device; None: 90% of its memory minus its weights
    step_overhead: float = STEP_OVERHEAD_S
    flops_eff: float = FLOPS_EFF
    bw_eff: float = BW_EFF
    trace: str | None = None


def _requests(spec: SweepSpec, workload: str, rate: float) -> list[Request]:
    if spec.trace:
        return rescale(load_trace(spec.trace), rate)
    return synthetic_trace(workload, rate, spec.num_requests, spec.seed)


def _kv_layout(profile: str) -> tuple[int, int]:
    """(KV block size, chunk alignment) of the shipped profile ``vendor/arch``."""
    prof = load_shipped(profile)
    return prof.kv_block_size, prof.chunk_align


def split_model(label: str) -> tuple[str, int]:
    """``qwen2.5-72b@tp8`` -> (``qwen2.5-72b``, 8); a bare name is TP = 1."""
    name, at, tp = label.partition("@tp")
    if at and (not tp.isdigit() or int(tp) < 1):
        raise ValueError(f"bad model label {label!r}: expected NAME or NAME@tpN")
    n, d = int(tp or 1), MODELS.get(name)
    if d is not None:
        try:
            check_split(d.heads, d.kv_heads, d.intermediate, n)  # the engine's own rule
        except ValueError as e:
            raise ValueError(f"{label}: {e}") from None
    return name, n


def kv_cache_gib(spec: SweepSpec, dev: DeviceSpec, model: str, tp: int) -> float:
    """``spec.kv_cache_gib``, or 90% of the device's memory less one rank's fp16 weights."""
    if spec.kv_cache_gib is not None:
        return spec.kv_cache_gib
    if dev.memory is None:
        raise ValueError(f"profile {dev.name!r} states no device.memory_gib: pass --kv-cache-gib")
    free = 0.9 * dev.memory - weight_bytes(model, tp)
    if free <= 0:
        raise ValueError(f"{model} at TP={tp} does not fit {dev.name} ({weight_bytes(model, tp) / 2**30:.0f} GiB of "
                         f"weights per device)")  # fmt: skip
    return free / 2**30


def _sig2(x: float) -> float:
    """``x`` rounded to two significant digits (readable rate labels)."""
    return float(f"{x:.2g}")


def sweep(spec: SweepSpec) -> dict:
    """Every run of ``spec``: report rows, capacities, and the TBT quantiles at the middle rate."""
    rows, capacity, cdfs = [], [], []
    for profile in spec.profiles:
        dev = device_spec(profile, spec.flops_eff, spec.bw_eff, spec.step_overhead)
        block_size, chunk_align = _kv_layout(profile)
        for model in spec.models:
            name, tp = split_model(model)
            kv = kv_cache_gib(spec, dev, name, tp)
            base = SimConfig(name, dev, "tokenwise", spec.budget, spec.max_num_seqs, kv, block_size, chunk_align, tp)
            for workload in spec.workloads:
                burst = [Request(0.0, r.prompt_len, r.output_len) for r in _requests(spec, workload, 1.0)]
                cap = completion_rate(simulate(burst, base))
                capacity.append({"profile": profile, "model": model, "workload": workload, "capacity_rps": cap,
                                 "kv_cache_gib": round(kv, 1)})  # fmt: skip
                rates = spec.rates or [_sig2(f * cap) for f in LOAD_FRACTIONS]
                mid = rates[(len(rates) - 1) // 2]
                for rate in rates:
                    reqs = _requests(spec, workload, rate)
                    for policy in spec.policies:
                        res = simulate(reqs, replace(base, policy=policy))
                        rows.append({"profile": profile, "workload": workload, **summarize(res, rate, spec.slo),
                                     "model": model})  # fmt: skip
                        if rate == mid:
                            q = np.quantile(tbt_gaps(res), np.linspace(0, 1, CDF_POINTS)) * 1e3
                            key = {k: rows[-1][k] for k in ("profile", "model", "workload", "policy", "rate")}
                            cdfs.append({**key, "tbt_quantiles_ms": [round(float(v), 3) for v in q]})
    return {"spec": {**asdict(spec), "slo": asdict(spec.slo)}, "capacity": capacity, "rows": rows, "tbt_cdf": cdfs}


def _img(kind: str, profile: str) -> str:
    return f"sim_{kind}_{profile.replace('/', '_')}.png"


def _grid(spec: SweepSpec):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = len(spec.models), len(spec.workloads)
    fig, axes = plt.subplots(nr, nc, figsize=(3.4 * nc, 2.5 * nr), squeeze=False)
    return plt, fig, axes


def plot_goodput(report: dict, spec: SweepSpec, profile: str, path: Path) -> None:
    """Goodput vs offered rate, one panel per model x workload, one line per policy."""
    plt, fig, axes = _grid(spec)
    for i, model in enumerate(spec.models):
        for j, workload in enumerate(spec.workloads):
            ax = axes[i][j]
            for policy in spec.policies:
                key = (profile, model, workload, policy)
                pts = [(r["rate"], r["goodput_rps"]) for r in report["rows"] if _key(r) == key]
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1, label=policy)
            ax.set_title(f"{model}, {workload}", fontsize=8)
            ax.set_xlabel("offered rate (req/s)", fontsize=7)
            ax.set_ylabel("goodput (req/s)", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3, lw=0.4)
    axes[0][0].legend(fontsize=6)
    slo = f"TTFT <= {spec.slo.ttft:g} s, every TBT <= {spec.slo.tbt * 1e3:g} ms"
    fig.suptitle(f"{profile}: goodput ({slo})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_tbt_cdf(report: dict, spec: SweepSpec, profile: str, path: Path) -> None:
    """CDF of every inter-token gap at the middle swept rate, one panel per model x workload."""
    from matplotlib.ticker import NullFormatter

    plt, fig, axes = _grid(spec)
    frac = np.linspace(0, 1, CDF_POINTS)
    for i, model in enumerate(spec.models):
        for j, workload in enumerate(spec.workloads):
            ax = axes[i][j]
            rate = None
            for c in report["tbt_cdf"]:
                if (c["profile"], c["model"], c["workload"]) == (profile, model, workload):
                    ax.plot(c["tbt_quantiles_ms"], frac, lw=1, label=c["policy"])
                    rate = c["rate"]
            ax.axvline(spec.slo.tbt * 1e3, color="grey", ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{model}, {workload} @ {rate:g} req/s", fontsize=8)
            ax.set_xlabel("TBT (ms)", fontsize=7)
            ax.set_ylabel("fraction of gaps", fontsize=7)
            ax.tick_params(labelsize=6, which="both")
            ax.grid(alpha=0.3, lw=0.4, which="both")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{profile}: TBT CDF (dotted: the TBT target)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _key(row: dict) -> tuple[str, str, str, str]:
    return row["profile"], row["model"], row["workload"], row["policy"]


def _peak(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: (r["goodput_rps"], -r["rate"]))


def markdown(report: dict, spec: SweepSpec, command: str) -> str:
    """The report: assumptions, the headline peak goodput per policy, per-profile plots and rows."""
    slo, rows = spec.slo, report["rows"]
    lines = [
        "# Step simulator: token-wise vs prefill-first vs decode-first scheduling",
        "",
        f"Generated by `{command}` (CPU only, no device).",
        "",
        "Request traces are replayed through the real `Scheduler` / `BlockManager` "
        "(`portable_xy/tools/bench/simulate.py`); each step's token table is timed by a roofline model "
        "(`portable_xy/tools/bench/step_model.py`): fp16, on one device or, for `MODEL@tpN`, on N devices with "
        "tensor parallelism (per-rank shapes plus ring all-reduces over the profile's `device.interconnect`); "
        "every linear op and the step's one attention kernel take max(FLOPs / (peak FLOP/s x "
        f"{spec.flops_eff:g}), bytes / (peak bandwidth x {spec.bw_eff:g})), weights read once per step, "
        f"attention FLOPs over the causal area and K/V read per stage, LM head for sampled rows, plus "
        f"{spec.step_overhead * 1e3:g} ms of host overhead per step. Peaks: the profile's "
        "`device.peak_tflops.fp16` / `device.peak_gbps`; KV block size and chunk alignment: the profile's. "
        f"Budget B = {spec.budget} tokens, at most {spec.max_num_seqs} sequences, "
        f"{_kv_text(spec)} of KV cache per device (running out preempts and recomputes), no prefix caching, "
        "no speculation.",
        "",
        f"Workloads: {_workload_text(spec)}. Rates: {_rates_text(spec)}.",
        "",
        f"**Goodput** = offered rate x *attainment*, the fraction of requests that meet the SLO: TTFT <= "
        f"{slo.ttft:g} s **and every** inter-token gap <= {slo.tbt * 1e3:g} ms. *Throughput* = completed requests "
        "/ simulated makespan (which includes draining the last requests, so it reads below the offered rate on "
        "a finite trace). Latencies are simulated milliseconds.",
        "",
        "## Headline: peak goodput over the swept rates (req/s), and the highest rate with >= 90% attainment",
        "",
        "| profile | model | workload | capacity (req/s) | " + " | ".join(spec.policies) + " |",
        "| --- | --- | --- | --- |" + " --- |" * len(spec.policies),
    ]
    for cap in report["capacity"]:
        key = (cap["profile"], cap["model"], cap["workload"])
        cells = []
        for policy in spec.policies:
            sel = [r for r in rows if _key(r) == (*key, policy)]
            ok = [r["rate"] for r in sel if r["slo_attainment"] >= 0.9]
            cells.append(f"{_peak(sel)['goodput_rps']:.2f} (90%: {max(ok) if ok else '-'})")
        lines.append(f"| {' | '.join(key)} | {cap['capacity_rps']:.2f} | " + " | ".join(cells) + " |")
    lines += _tp_split(spec)
    stuck = [r for r in rows if r["livelock"]]
    if stuck:
        runs = ", ".join(f"{r['profile']} {r['model']} {r['workload']} {r['policy']} @ {r['rate']:g}" for r in stuck)
        lines += ["", f"**Livelocked runs** (stopped; unfinished requests count as missing the SLO): {runs}."]
    lines += ["", NOTES.rstrip()]
    cols = ("rate", "policy", "completed", "throughput_rps", "ttft_p50_ms", "ttft_p99_ms", "tbt_p50_ms", "tbt_p99_ms",
            "tbt_max_ms", "preemptions", "slo_attainment", "goodput_rps")  # fmt: skip
    for profile in spec.profiles:
        lines += ["", f"## {profile}", "", f"![goodput]({'img/' + _img('goodput', profile)})",
                  f"![TBT CDF]({'img/' + _img('tbt_cdf', profile)})"]  # fmt: skip
        for cap in [c for c in report["capacity"] if c["profile"] == profile]:
            lines += ["", f"### {cap['model']}, {cap['workload']}", "", "| " + " | ".join(cols) + " |",
                      "|" + " --- |" * len(cols)]  # fmt: skip
            for r in rows:
                if (r["profile"], r["model"], r["workload"]) == (profile, cap["model"], cap["workload"]):
                    lines.append("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _kv_text(spec: SweepSpec) -> str:
    if spec.kv_cache_gib is not None:
        return f"{spec.kv_cache_gib:g} GiB"
    return "90% of the device's memory (`device.memory_gib`) less its fp16 weights (capacity table)"


def _tp_split(spec: SweepSpec) -> list[str]:
    """Lines of a table: modelled decode and prefill step times split into compute and communication."""
    labels = [m for m in spec.models if split_model(m)[1] > 1]
    if not labels:
        return []
    decode = [StageShape(1, 1024, True)] * 64
    prefill = [StageShape(spec.budget, 0, True)]
    out = ["", "## Tensor parallelism: modelled step time (ms), compute + communication", "",
           f"Decode: 64 sequences at 1024 tokens of history; prefill: one {spec.budget}-token chunk. Host overhead "
           f"({spec.step_overhead * 1e3:g} ms) not included.", "",
           "| profile | model | TP=1 decode | decode compute | decode comm | prefill compute | prefill comm |",
           "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for profile in spec.profiles:
        dev = device_spec(profile, spec.flops_eff, spec.bw_eff, spec.step_overhead)
        for label in labels:
            name, tp = split_model(label)
            one = step_time_parts(name, dev, decode, 1)["compute"]
            d, p = step_time_parts(name, dev, decode, tp), step_time_parts(name, dev, prefill, tp)
            cells = [one, d["compute"], d["comm"], p["compute"], p["comm"]]
            out.append(f"| {profile} | {label} | " + " | ".join(f"{c * 1e3:.2f}" for c in cells) + " |")
    return out


def _rates_text(spec: SweepSpec) -> str:
    if spec.rates:
        return f"{', '.join(f'{r:g}' for r in spec.rates)} req/s (`--rates`)"
    return (
        f"{', '.join(f'{f:g}' for f in LOAD_FRACTIONS)} x the capacity, rounded to 2 digits. Capacity: a run "
        "with every request at t = 0 under the token-wise policy, requests/s completed between its 10th and "
        "90th percentile completion (without the ramp-up and the tail)"
    )


def _workload_text(spec: SweepSpec) -> str:
    if spec.trace:
        return f"the JSONL trace `{spec.trace}`, its arrival times rescaled to each rate"
    parts = [
        f"*{w}* (Poisson arrivals; lognormal prompt median {LENGTH_MIXES[w]['prompt'][0]} sigma "
        f"{LENGTH_MIXES[w]['prompt'][1]}, output median {LENGTH_MIXES[w]['output'][0]} sigma "
        f"{LENGTH_MIXES[w]['output'][1]}; output clipped to 1024 and prompt + output to 4096 tokens)"
        for w in spec.workloads
    ]
    return "; ".join(parts) + f"; a separate trace of {spec.num_requests} requests (seed {spec.seed}) per rate"


def write_report(spec: SweepSpec, out_dir: str, command: str) -> list[Path]:
    """Run the sweep and write ``simulator.json``, ``simulator.md`` and the PNGs under ``out_dir``."""
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    report = sweep(spec)
    written = [out / "simulator.json", out / "simulator.md"]
    written[0].write_text(json.dumps(report, indent=1) + "\n")
    written[1].write_text(markdown(report, spec, command))
    for profile in spec.profiles:
        for kind, plot in (("goodput", plot_goodput), ("tbt_cdf", plot_tbt_cdf)):
            path = out / "img" / _img(kind, profile)
            plot(report, spec, profile, path)
            written.append(path)
    return written


def _floats(text: str) -> list[float]:
    vals = [float(x) for x in text.split(",") if x.strip()]
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected a comma list of positive numbers, got {text!r}")
    return vals


def _model_labels(text: str) -> list[str]:
    """``all`` or a comma list of model names, each optionally ``@tpN``."""
    if text == "all":
        return list(MODELS)
    labels = [x.strip() for x in text.split(",") if x.strip()]
    try:
        model_names(",".join(split_model(label)[0] for label in labels))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return labels


def _names(text: str, known) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {list(known)}")
    return names


def _command(args: argparse.Namespace) -> str:
    """The full invocation, every option spelled out (for the report)."""
    argv = ["portable-xy", "bench", "simulate"]
    for p in args.profile or DEFAULT_PROFILES:
        argv += ["--profile", p]
    argv += ["--models", ",".join(args.models), "--policies", ",".join(args.policies)]
    argv += ["--trace", args.trace] if args.trace else ["--workloads", ",".join(args.workloads)]
    if args.rates:
        argv += ["--rates", ",".join(f"{r:g}" for r in args.rates)]
    for opt in ("num_requests", "seed", "ttft_target_s", "tbt_target_ms", "budget", "max_num_seqs", "kv_cache_gib",
                "step_overhead_ms", "flops_eff", "bw_eff", "out"):  # fmt: skip
        val = getattr(args, opt)
        argv += ["--" + opt.replace("_", "-"), args.out if opt == "out" else "auto" if val is None else f"{val:g}"]
    return shlex.join(argv)


def _run_cli(args: argparse.Namespace) -> int:
    spec = SweepSpec(
        profiles=list(args.profile or DEFAULT_PROFILES),
        models=args.models,
        workloads=[Path(args.trace).stem] if args.trace else args.workloads,
        policies=args.policies,
        num_requests=args.num_requests,
        seed=args.seed,
        rates=args.rates,
        slo=Slo(args.ttft_target_s, args.tbt_target_ms * 1e-3),
        budget=args.budget,
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib,
        step_overhead=args.step_overhead_ms * 1e-3,
        flops_eff=args.flops_eff,
        bw_eff=args.bw_eff,
        trace=args.trace,
    )
    for path in write_report(spec, args.out, _command(args)):
        print(f"wrote {path}")
    return 0


def add_simulate_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("simulate", help="roofline step simulator: goodput of scheduling policies (no device)")
    p.add_argument("--profile", action="append", help=f"vendor/arch, repeatable (default: {list(DEFAULT_PROFILES)})")
    p.add_argument("--models", type=_model_labels, default="llama2-7b,qwen2-7b",
                   help=f"'all' or a comma list of {list(MODELS)}, each optionally @tpN (tensor "
                   "parallelism)")  # fmt: skip
    p.add_argument("--workloads", type=lambda s: _names(s, LENGTH_MIXES), default=list(LENGTH_MIXES),
                   help=f"comma list of synthetic mixes {list(LENGTH_MIXES)}")  # fmt: skip
    p.add_argument("--policies", type=lambda s: _names(s, POLICIES), default=list(POLICIES), help="comma list")
    p.add_argument("--trace", help="JSONL trace (arrival, prompt_len, output_len) instead of --workloads")
    p.add_argument("--rates", type=_floats, help="request rates (req/s); default: fractions of the capacity")
    p.add_argument("--num-requests", type=int, default=300, help="requests per synthetic trace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ttft-target-s", type=float, default=2.0)
    p.add_argument("--tbt-target-ms", type=float, default=100.0)
    p.add_argument("--budget", type=int, default=2048, help="token budget per step (max_num_batched_tokens)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-cache-gib", type=lambda v: None if v == "auto" else float(v), default=40.0,
                   help="KV-cache memory per device, or 'auto': 90%% of the profile's memory_gib less "
                   "the weights")  # fmt: skip
    p.add_argument("--step-overhead-ms", type=float, default=STEP_OVERHEAD_S * 1e3, help="host cost per step")
    p.add_argument("--flops-eff", type=float, default=FLOPS_EFF, help="achieved fraction of peak FLOP/s")
    p.add_argument("--bw-eff", type=float, default=BW_EFF, help="achieved fraction of peak bandwidth")
    p.add_argument("--out", required=True, help="output directory (simulator.json / .md, img/*.png)")
    p.set_defaults(func=_run_cli)
    return p
