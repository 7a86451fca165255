"""Stage 5, AOT cross-check (CUDA): the registers, spills and shared memory of every kernel the JIT
compiled during this run, next to ``kernels aot-report`` for the device's arch. A JIT kernel that
spills fails; a register count far from the AOT report's for the same kernel is noted."""

from __future__ import annotations

from typing import Any

from .report import Stage

KERNEL_MODULES = ("smooth_gemm", "quant_gemm", "meta_attention", "rms_norm", "rope", "activation", "kv_cache",
                  "sampling", "fused_moe")  # fmt: skip


def jit_kernels() -> list[dict[str, Any]]:
    """Every kernel binary in the JIT caches of the kernel modules."""
    import importlib

    import triton

    rows = []
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(f"portable_xy.triton_kernels.{mod_name}")
        for obj in vars(mod).values():
            if not isinstance(obj, triton.runtime.JITFunction) or obj.__module__ != mod.__name__:
                continue
            for cache in getattr(obj, "device_caches", {}).values():
                binaries = cache[0] if isinstance(cache, tuple) else cache
                for kernel in binaries.values():
                    if getattr(kernel, "n_regs", None) is None and hasattr(kernel, "_init_handles"):
                        kernel._init_handles()
                    md = kernel.metadata
                    rows.append({"kernel": obj.__name__, "module": mod_name, "num_warps": md.num_warps,
                                 "num_stages": md.num_stages, "registers": kernel.n_regs, "spills": kernel.n_spills,
                                 "shared_bytes": md.shared})  # fmt: skip
    return rows


def run(stage: Stage, be) -> None:
    platform = be.platform
    if not platform.aot_archs:
        interp = platform.triton_interpreted
        why = "the interpreter compiles nothing" if interp else f"no AOT report for {platform.name}"
        stage.skip("JIT vs AOT", why)
        return

    from ..aot import aot_report

    jit = jit_kernels()
    stage.data["jit"] = jit
    stage.check("JIT kernels found", bool(jit), f"{len(jit)} compiled kernels")
    spilled = [r for r in jit if r["spills"]]
    stage.check("no JIT kernel spills", not spilled, "; ".join(f"{r['kernel']} w{r['num_warps']}: {r['spills']}"
                                                             for r in spilled))  # fmt: skip
    arch = platform.detect().arch
    if arch not in platform.aot_archs:
        stage.skip("AOT report", f"no AOT profile for {arch}")
        return
    reports = aot_report([arch])
    aot = [{"kernel": r.kernel, "config": r.config, "num_warps": r.num_warps, "registers": r.registers,
            "spills": (r.spill_stores or 0) + (r.spill_loads or 0), "smem_bytes": r.smem_bytes, "verdict": r.verdict}
           for r in reports]  # fmt: skip
    stage.data["aot"] = aot
    bad = [a for a in aot if a["verdict"] == "FAIL"]
    stage.check(f"AOT report {arch} clean", not bad, "; ".join(f"{a['kernel']} {a['config']}" for a in bad))
    notes = []
    for name in sorted({r["kernel"] for r in jit}):
        j = [r["registers"] for r in jit if r["kernel"] == name]
        a = [x["registers"] for x in aot if x["kernel"] == name and x["registers"] is not None]
        if a and max(j) > max(a) + 32:
            notes.append(f"{name}: JIT up to {max(j)} registers, AOT up to {max(a)}")
    stage.check("JIT registers within the AOT report's range", True, "; ".join(notes))
