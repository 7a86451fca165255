"""``portable-xy bench kernels``: SmoothGEMM and Meta-Attention against the vendor library and a
one-tile / one-launch-per-stage baseline, (``--kernels quant_gemm``) the weight-only quantized
GEMM against SmoothGEMM and the vendor GEMM on the dequantized weights, and (``--kernels moe``) the
fused-MoE kernel against a per-expert torch loop, written as a JSON report.

Report schema (``schema_version`` 1)::

    {
      "schema": "portable_xy.bench.kernels", "schema_version": 1,
      "created": ISO-8601 UTC, "tiny": bool, "dtype": "float16" | ...,
      "models": [model names], "tp": 8,
      "env": {backend, device, driver, torch, triton, triton_package, python, platform,
              profile ("<vendor>/<arch>" ...), profile_sources, num_cores, + Platform.environment},
      "peaks": {"tflops": float | null, "gbps": float | null},   # from the profile (or --peak-*)
      "timing": {"method": Platform.event_timer | "perf_counter", "warmup": int, "reps": int,
                 "statistic": "median"},
      "errors": [{"kernel", "case", "impl", "error"}],   # calls that raised (not timed)
      "results": [{
        "kernel": "gemm" | "attention" | "quant_gemm" | "moe",
        "case": "llama2-7b/qkv/M=64" | "llama2-7b/decode_b8_c128" | "llama2-7b/qkv/q4_0/M=64"
                | "mixtral-8x7b/moe/M=64" ...,                # unique per kernel
        "shape": "llama2-7b/qkv" | "llama2-7b/decode" | "llama2-7b/qkv/q4_0" | "mixtral-8x7b/moe" ...,
        "params": {M, N, K} | {query_lens, seq_lens, num_heads, num_kv_heads, head_dim, ...}
                  | {M, N, K, qtype} | {M, experts, top_k, hidden, intermediate},
        "impl": "smooth_gemm" | "single_tile" | "meta_attention" | "per_stage" | "quant_gemm" | "vendor"
                | "fused_moe" | "per_expert",
        "detail": str, "latency_s": float, "flops": int, "bytes": int,
        "tflops": float, "gbps": float,
        "frac_peak_flops": float | null, "frac_peak_bw": float | null,
        "utilisation": float | null      # max of the two fractions (the roofline-bound share)
      }]
    }

``bytes`` is the minimum traffic (every operand read once, the output written once); attention
``flops`` count only visible (query, key) pairs: ``4 * pairs * num_heads * head_dim``. For
``quant_gemm`` rows ``bytes`` is per impl: the quantized weight (``qs``, ``d``, ``m``) for
``quant_gemm``, the dequantized x.dtype weight for its baselines. Shapes whose K is not a multiple
of 32 (the quantization block) have no ``quant_gemm`` rows. ``moe`` rows run every MoE layer of
``shapes.MOE_MODELS`` (whatever ``--model-shapes`` says) with uniform random top-k routing made
outside the timed call; ``flops`` count the routed assignments' GEMMs (``6 M k H I``), ``bytes``
read ``x``, write the output and read the weights of every expert chosen at least once.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ... import envs
from ...backends.platforms import PLATFORMS, get_platform
from .shapes import (
    M_SWEEP,
    M_SWEEP_TINY,
    MODELS,
    MOE_M_SWEEP,
    MOE_M_SWEEP_TINY,
    TINY_SCALE,
    TP,
    AttnCase,
    MoEShape,
    attention_cases,
    gemm_shapes,
    moe_shapes,
    rank_heads,
)

SCHEMA = "portable_xy.bench.kernels"
SCHEMA_VERSION = 1
OURS = {"gemm": "smooth_gemm", "attention": "meta_attention", "quant_gemm": "quant_gemm", "moe": "fused_moe"}
BASELINE = {"gemm": "single_tile", "attention": "per_stage", "quant_gemm": "smooth_gemm", "moe": "per_expert"}
QTYPES_DEFAULT = ("q4_0", "q8_0")  # q4_1 runs the 4-bit path of q4_0 (only m differs)
RESULT_KEYS = ("kernel", "case", "shape", "params", "impl", "detail", "latency_s", "flops", "bytes", "tflops",
               "gbps", "frac_peak_flops", "frac_peak_bw", "utilisation")  # fmt: skip
TOP_KEYS = ("schema", "schema_version", "created", "tiny", "dtype", "models", "tp", "env", "peaks", "timing", "results",
            "errors")  # fmt: skip
TINY_HEADS = (4, 2, 32)  # (query heads, KV heads, head dim) of tiny attention
CPU_BACKENDS = tuple(n for n, p in PLATFORMS.items() if p.host_threads)


def validate_report(report: dict) -> list[str]:
    """Schema problems of a kernel report (empty: valid)."""
    out = [f"missing key {k!r}" for k in TOP_KEYS if k not in report]
    if out:
        return out
    if report["schema"] != SCHEMA or report["schema_version"] != SCHEMA_VERSION:
        out.append(f"schema {report['schema']!r} v{report['schema_version']} != {SCHEMA!r} v{SCHEMA_VERSION}")
    for i, r in enumerate(report["results"]):
        missing = [k for k in RESULT_KEYS if k not in r]
        if missing:
            out.append(f"result {i}: missing {missing}")
        elif not (math.isfinite(r["latency_s"]) and r["latency_s"] > 0):
            out.append(f"result {i} ({r['case']} {r['impl']}): latency {r['latency_s']}")
    return out


def gemm_cost(M: int, N: int, K: int, elem_bytes: int) -> tuple[int, int]:
    """(flops, minimum bytes) of ``[M, K] x [N, K]^T``."""
    return 2 * M * N * K, (M * K + N * K + M * N) * elem_bytes


def attention_cost(case: AttnCase, hq: int, hkv: int, d: int, elem_bytes: int) -> tuple[int, int]:
    """(flops over visible pairs, minimum bytes: q read + out written + each stage's K/V read)."""
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(case.query_lens, case.seq_lens))
    nbytes = (2 * case.num_tokens * hq * d + 2 * sum(case.seq_lens) * hkv * d) * elem_bytes
    return 4 * pairs * hq * d, nbytes


def moe_cost(shape: MoEShape, M: int, experts_used: int, elem_bytes: int) -> tuple[int, int]:
    """(flops of the ``M * k`` routed assignments' three GEMMs, minimum bytes: x read, output
    written, every used expert's ``w13`` and ``w2`` read once)."""
    h, i = shape.hidden, shape.intermediate
    return 6 * M * shape.top_k * h * i, (2 * M * h + experts_used * 3 * h * i) * elem_bytes


def _metrics(latency: float, flops: int, nbytes: int, peaks: tuple[float | None, float | None]) -> dict[str, Any]:
    tflops, gbps = flops / latency / 1e12, nbytes / latency / 1e9
    ff = tflops / peaks[0] if peaks[0] else None
    fb = gbps / peaks[1] if peaks[1] else None
    util = max((f for f in (ff, fb) if f is not None), default=None)
    return dict(latency_s=latency, flops=flops, bytes=nbytes, tflops=tflops, gbps=gbps, frac_peak_flops=ff,
                frac_peak_bw=fb, utilisation=util)  # fmt: skip


def attention_inputs(case: AttnCase, hq: int, hkv: int, d: int, block_size: int, dtype, device, gen):
    """``(q, k_cache, v_cache, meta)``: each stage's blocks in a random order over the cache."""
    from ...backends import AttnMetadata

    nblk = [-(-s // block_size) for s in case.seq_lens]
    perm = torch.randperm(sum(nblk), generator=gen)
    tables = torch.zeros(len(nblk), max(nblk), dtype=torch.int32)
    used = 0
    for i, n in enumerate(nblk):
        tables[i, :n] = perm[used : used + n]
        used += n
    starts = [0]
    for q in case.query_lens:
        starts.append(starts[-1] + q)
    t = starts[-1]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    meta = AttnMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(case.seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=torch.full((t,), -1, dtype=torch.long, device=device),
        positions=torch.zeros(t, dtype=torch.long, device=device),
        query_lens_cpu=list(case.query_lens),
        seq_lens_cpu=list(case.seq_lens),
    )
    return rand(t, hq, d), rand(used, block_size, hkv, d), rand(used, block_size, hkv, d), meta


def run_kernel_bench(
    backend_name: str,
    models: list[str],
    tiny: bool | None = None,
    dtype: torch.dtype | None = None,
    warmup: int | None = None,
    reps: int | None = None,
    kernels: tuple[str, ...] = ("gemm", "attention"),
    peaks: tuple[float | None, float | None] | None = None,
    m_values: tuple[int, ...] | None = None,
    case_filter: str | None = None,
    qtypes: tuple[str, ...] = QTYPES_DEFAULT,
    log=print,
) -> dict:
    """Run the benchmark on ``backend_name`` and return the report (see the module doc).
    ``tiny`` defaults to True on ``cpu`` / ``interpret``; ``peaks`` overrides the profile's;
    ``m_values`` the GEMM M sweep; ``case_filter`` (a regex) keeps the cases whose name matches;
    ``qtypes`` the weight types of ``quant_gemm``."""
    from ...backends import get_backend
    from .env import device_peaks, environment, make_timer

    tiny = backend_name in CPU_BACKENDS if tiny is None else tiny
    if get_platform(backend_name).triton_interpreted and "triton" not in sys.modules:
        envs.set_triton_interpret(True)  # before the first triton import (the backend checks it)
    backend = get_backend(backend_name)
    dev = backend.device
    dtype = dtype or (torch.float32 if dev.type == "cpu" else torch.float16)
    warmup = warmup if warmup is not None else (1 if tiny else 10)
    reps = reps if reps is not None else (3 if tiny else 50)
    timer, method = make_timer(dev, warmup, reps)
    peaks = peaks or device_peaks(backend.profile, dtype)
    esize = torch.empty(0, dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(0)
    results: list[dict] = []
    errors: list[dict] = []

    def keep(case: str) -> bool:
        return case_filter is None or re.search(case_filter, case) is not None

    def record(kernel: str, case: str, shape: str, params: dict, impls: dict, flops: int,
               nbytes: int | dict[str, int]) -> None:  # fmt: skip
        for impl, (fn, detail) in impls.items():
            nb = nbytes[impl] if isinstance(nbytes, dict) else nbytes
            try:
                lat = timer(fn)
            except Exception as e:  # a failing kernel / library call must not lose the rest of a long run
                errors.append({"kernel": kernel, "case": case, "impl": impl, "error": f"{type(e).__name__}: {e}"})
                log(f"{kernel:9s} {case:40s} {impl:14s} FAILED: {errors[-1]['error']}")
                continue
            row = dict(kernel=kernel, case=case, shape=shape, params=params, impl=impl, detail=detail)
            results.append({**row, **_metrics(lat, flops, nb, peaks)})
            log(f"{kernel:9s} {case:40s} {impl:14s} {lat * 1e6:12.1f} us  {results[-1]['tflops']:8.3f} TF/s")

    from ...backends.quant import QBLOCK, quantize_ref
    from .impls import attention_impls, gemm_impls, moe_impls, quant_gemm_impls

    for model in models:
        if "gemm" in kernels:
            for shape in gemm_shapes(model, TP, TINY_SCALE if tiny else 1):
                w = torch.randn(shape.N, shape.K, generator=gen).to(device=dev, dtype=dtype)
                for M in m_values or (M_SWEEP_TINY if tiny else M_SWEEP):
                    if not keep(f"{shape.name}/M={M}"):
                        continue
                    x = torch.randn(M, shape.K, generator=gen).to(device=dev, dtype=dtype)
                    flops, nbytes = gemm_cost(M, shape.N, shape.K, esize)
                    params = {"M": M, "N": shape.N, "K": shape.K}
                    record("gemm", f"{shape.name}/M={M}", shape.name, params, gemm_impls(backend, x, w), flops, nbytes)
        if "quant_gemm" in kernels:
            for shape in gemm_shapes(model, TP, TINY_SCALE if tiny else 1):
                if shape.K % QBLOCK:
                    log(f"quant_gemm {shape.name}: K={shape.K} is not a multiple of {QBLOCK}: skipped")
                    continue
                w = torch.randn(shape.N, shape.K, generator=gen) / math.sqrt(shape.K)
                for qtype in qtypes:
                    qw = quantize_ref(w, qtype).to(dev)
                    for M in m_values or (M_SWEEP_TINY if tiny else M_SWEEP):
                        case = f"{shape.name}/{qtype}/M={M}"
                        if not keep(case):
                            continue
                        x = torch.randn(M, shape.K, generator=gen).to(device=dev, dtype=dtype)
                        flops, dense = gemm_cost(M, shape.N, shape.K, esize)
                        quant = (M * shape.K + M * shape.N) * esize + qw.nbytes
                        params = {"M": M, "N": shape.N, "K": shape.K, "qtype": qtype}
                        record("quant_gemm", case, f"{shape.name}/{qtype}", params, quant_gemm_impls(backend, x, qw),
                               flops, {"quant_gemm": quant, "smooth_gemm": dense, "vendor": dense})  # fmt: skip
        if "attention" in kernels:
            hq, hkv = rank_heads(MODELS[model], TP)
            d = MODELS[model].head_dim
            if tiny:
                hq, hkv, d = TINY_HEADS
            for case in attention_cases(tiny):
                if not keep(f"{model}/{case.name}"):
                    continue
                q, kc, vc, meta = attention_inputs(case, hq, hkv, d, backend.profile.kv_block_size, dtype, dev, gen)
                impls = attention_impls(backend, q, kc, vc, meta, d**-0.5)
                flops, nbytes = attention_cost(case, hq, hkv, d, esize)
                params = dict(query_lens=case.query_lens, seq_lens=case.seq_lens, num_heads=hq, num_kv_heads=hkv,
                              head_dim=d, **case.params)  # fmt: skip
                record("attention", f"{model}/{case.name}", f"{model}/{case.group}", params, impls, flops, nbytes)
                del q, kc, vc, meta, impls
    if "moe" in kernels:
        from ...backends.reference import moe_route_ref

        for shape in moe_shapes(TINY_SCALE if tiny else 1):
            h, i, E = shape.hidden, shape.intermediate, shape.experts
            w13 = (torch.randn(E, 2 * i, h, generator=gen) / math.sqrt(h)).to(device=dev, dtype=dtype)
            w2 = (torch.randn(E, h, i, generator=gen) / math.sqrt(i)).to(device=dev, dtype=dtype)
            for M in m_values or (MOE_M_SWEEP_TINY if tiny else MOE_M_SWEEP):
                case = f"{shape.name}/M={M}"
                if not keep(case):
                    continue
                x = torch.randn(M, h, generator=gen).to(device=dev, dtype=dtype)
                weights, ids = moe_route_ref(torch.randn(M, E, generator=gen), shape.top_k, True)
                weights, ids = weights.to(dev), ids.to(dev)
                flops, nbytes = moe_cost(shape, M, int(torch.unique(ids).numel()), esize)
                params = {"M": M, "experts": E, "top_k": shape.top_k, "hidden": h, "intermediate": i}
                record("moe", case, shape.name, params, moe_impls(backend, x, w13, w2, weights, ids), flops, nbytes)
            del w13, w2
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tiny": tiny,
        "dtype": str(dtype).removeprefix("torch."),
        "models": list(models),
        "tp": TP,
        "env": environment(backend_name, dev, backend.profile),
        "peaks": {"tflops": peaks[0], "gbps": peaks[1]},
        "timing": {"method": method, "warmup": warmup, "reps": reps, "statistic": "median"},
        "results": results,
        "errors": errors,
    }


def _run_cli(args: argparse.Namespace) -> int:
    from .shapes import model_names

    dtype = getattr(torch, args.dtype) if args.dtype else None
    kernels = tuple(args.kernels.split(","))
    qtypes = tuple(q.strip() for q in args.qtypes.split(",") if q.strip())
    from ...backends.quant import QTYPES

    if not qtypes or set(qtypes) - set(QTYPES):
        print(f"bench kernels: --qtypes takes a comma list of {list(QTYPES)}, got {args.qtypes!r}", file=sys.stderr)
        return 2
    if not kernels or set(kernels) - set(OURS):
        print(f"bench kernels: --kernels takes a comma list of {list(OURS)}, got {args.kernels!r}", file=sys.stderr)
        return 2
    report = run_kernel_bench(
        args.backend, model_names(args.model_shapes), tiny=True if args.tiny else None, dtype=dtype,
        warmup=args.warmup, reps=args.reps, kernels=kernels,
        peaks=(args.peak_tflops, args.peak_gbps) if args.peak_tflops or args.peak_gbps else None,
        m_values=tuple(int(m) for m in args.m_values.split(",")) if args.m_values else None, case_filter=args.filter,
        qtypes=qtypes,
    )  # fmt: skip
    problems = validate_report(report)
    if problems:
        print("bench kernels: invalid report: " + "; ".join(problems), file=sys.stderr)
        return 1
    for e in report["errors"]:
        print(f"bench kernels: {e['case']} {e['impl']} failed: {e['error']}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out} ({len(report['results'])} results, {len(report['errors'])} errors)")
    return 1 if report["errors"] else 0


def add_kernels_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "kernels", help="SmoothGEMM / Meta-Attention / quantized GEMM / fused MoE vs baselines -> JSON"
    )
    p.add_argument("--backend", required=True, choices=list(PLATFORMS))
    p.add_argument("--model-shapes", default="all", help=f"'all' or a comma list of {list(MODELS)}")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--tiny", action="store_true", help="scaled-down shapes, few repeats (default on cpu/interpret)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: fp16 on devices, fp32 on CPU")
    p.add_argument("--kernels", default="gemm,attention", help="comma list of gemm, attention, quant_gemm, moe")
    p.add_argument("--qtypes", default=",".join(QTYPES_DEFAULT), help="quant_gemm weight types: q4_0, q4_1, q8_0")
    p.add_argument("--m-values", help="GEMM / MoE token counts, e.g. 1,64,4096 (default: the M sweeps)")
    p.add_argument("--filter", help="regex: only cases whose name matches (e.g. 'qkv|decode')")
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--peak-tflops", type=float, help="override the profile's peak TFLOP/s (e.g. for cpu)")
    p.add_argument("--peak-gbps", type=float, help="override the profile's peak GB/s")
    p.set_defaults(func=_run_cli)
    return p
