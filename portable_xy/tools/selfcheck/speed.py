"""Stage 4, speed (short): ``bench kernels`` on the model shapes against the vendor libraries
(the platform's ``vendor_gemm`` and ``vendor_attention``, else torch SDPA), and ``bench e2e``
on the ~1B Llama-shaped model against HF transformers. Figures, not pass / fail: a check fails
only when a benchmark call raised. The full reports are written next to the stage's JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .report import Stage


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize_kernels(report: dict) -> dict[str, Any]:
    """Per kernel and case, our latency against the vendor's; geometric means of the speedups."""
    by_case: dict[tuple[str, str], dict[str, float]] = {}
    for r in report["results"]:
        by_case.setdefault((r["kernel"], r["case"]), {})[r["impl"]] = r["latency_s"]
    rows, speedups = [], {"gemm": [], "attention": []}
    for (kernel, case), lat in sorted(by_case.items()):
        ours = lat.get("smooth_gemm") or lat.get("meta_attention")
        vendor = lat.get("vendor")
        sp = vendor / ours if ours and vendor else None
        if sp:
            speedups[kernel].append(sp)
        rows.append({"kernel": kernel, "case": case, "ours_us": ours and ours * 1e6,
                     "vendor_us": vendor and vendor * 1e6, "speedup_vs_vendor": sp})  # fmt: skip
    return {"cases": rows, "geomean_speedup_vs_vendor": {k: _geomean(v) for k, v in speedups.items()}}


def run(stage: Stage, be, quick: bool, out: Path, model_path: Path | None) -> None:
    from ..bench.e2e import run_e2e
    from ..bench.kernels import run_kernel_bench

    interp = be.device.type == "cpu"
    dtype = torch.float32 if interp else torch.bfloat16
    models = ["llama2-7b"] if quick or interp else ["llama2-7b", "qwen2-7b", "qwen2.5-72b"]
    m_values = None if interp else ((1, 16, 64, 256, 1024, 4096) if quick else None)

    def kernels() -> dict[str, Any]:
        reps = 20 if quick and not interp else None
        rep = run_kernel_bench(be.name, models, dtype=dtype, m_values=m_values, reps=reps, log=lambda *_: None)
        (out / "bench_kernels.json").write_text(json.dumps(rep, indent=1) + "\n")
        if rep["errors"]:
            raise AssertionError(f"{len(rep['errors'])} benchmark calls raised: {rep['errors'][:3]}")
        summary = summarize_kernels(rep)
        stage.data["kernels"] = summary
        g = summary["geomean_speedup_vs_vendor"]
        return {"geomean_speedup_vs_vendor": g, "timing": rep["timing"]}

    stage.run(f"bench kernels {', '.join(models)} ({str(dtype).removeprefix('torch.')})", kernels)
    if model_path is None:
        stage.skip("bench e2e", "no model was built (the end-to-end stage did not run)")
        return

    def e2e() -> dict[str, Any]:
        n, inp, outl = (2, 8, 4) if interp else ((16, 256, 64) if quick else (64, 512, 128))
        rep = run_e2e(str(model_path), be.name, str(dtype).removeprefix("torch."), num_requests=n, input_len=inp,
                      output_len=outl, max_model_len=1024, compare_hf=True, log=lambda *_: None,
                      engine_kwargs={"skip_tokenizer_init": True})  # fmt: skip
        (out / "bench_e2e.json").write_text(json.dumps(rep, indent=1) + "\n")
        eng = rep["engines"]
        res = {k: eng[k].get("output_tok_s") for k in eng}
        stage.data["e2e"] = {"output_tok_s": res, "ratios": rep["ratios"], "workload": rep["workload"]}
        return {"output_tok_s": res, "ratios": rep["ratios"]}

    stage.run(f"bench e2e {model_path.name} vs HF", e2e)
