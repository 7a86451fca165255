"""Ahead-of-time CUDA compilation report: compile every kernel config for sm_80 / sm_90 on a
machine WITHOUT a GPU and check registers, spills, shared memory and tensor-core use.

Every kernel module of ``portable_xy.triton_kernels`` has its configs in
:mod:`portable_xy.tools.aot_specs` (the spec format is described there), asked for under the CUDA
profile of the architecture (``load_profile("cuda", "sm80" | "sm90")``).

Each config is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
into a fresh, throw-away Triton cache (nothing is reused across runs, so a regression cannot hide
behind a cached binary). The cubin goes through Triton's bundled ``cuobjdump``:
``--dump-resource-usage`` (registers, stack, static shared, local) and ``--dump-sass``
(HMMA / HGMMA / IMMA / IGMMA counts, local loads/stores); ``ptxas -v``'s log gives the exact spill
bytes. Shared memory = dynamic (compiled metadata ``shared``) + static (cuobjdump ``SHARED``),
compared with the opt-in per-block maximum of the arch (sm_80: 166912 B, sm_90: 232448 B).

Verdict FAIL on: a compile error, spill stores/loads > 0, shared memory over the limit, or a config
with ``expect_tensor_cores`` whose SASS misses the tensor-core instruction: HMMA/IMMA on sm_80;
HGMMA/IGMMA (wgmma) on sm_90 -- except where wgmma cannot apply (no dot with an M tile that is a
multiple of 64, or num_warps not a multiple of 4), where Triton legitimately emits mma.sync (HMMA)
and that is accepted (the report says so). ``expect_tensor_cores="mma"`` accepts either on sm_90.
WARN (non-fatal): ptxas serialized wgmma for lack of registers (C7511). Notes (OK): e.g. HMMA
used on sm_90 where wgmma cannot apply.

Triton is imported lazily: ``portable-xy generate`` must work without it installed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import envs
from ..backends.device import CUDA_SMEM_PER_BLOCK
from .aot_specs import KERNEL_SPECS

ARCHS: dict[str, dict[str, Any]] = {
    "sm_80": {"cc": 80, "profile_arch": "sm80", "smem_limit": CUDA_SMEM_PER_BLOCK["sm80"], "tc": ("HMMA", "IMMA")},
    "sm_90": {"cc": 90, "profile_arch": "sm90", "smem_limit": CUDA_SMEM_PER_BLOCK["sm90"], "tc": ("HGMMA", "IGMMA")},
}
SASS_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "STL", "LDL")


def normalize_arch(arch: str) -> str:
    """``sm_90`` / ``sm90`` / ``90`` -> ``sm_90``."""
    a = str(arch).lower().replace("sm_", "").replace("sm", "").strip()
    key = f"sm_{a}"
    if key not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; choose from {sorted(ARCHS)}")
    return key


@dataclass
class KernelReport:
    kernel: str
    module: str
    arch: str
    config: str
    num_warps: int
    num_stages: int
    expect_tensor_cores: Any
    compiled: bool = False
    error: str | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    smem_dynamic: int | None = None
    smem_static: int | None = None
    smem_bytes: int | None = None
    smem_limit: int = 0
    sass_counts: dict[str, int] = field(default_factory=dict)
    tensor_core_insns: int = 0
    dot_m_tiles: list[int] = field(default_factory=list)
    wgmma_applicable: bool | None = None
    verdict: str = "FAIL"
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.verdict != "FAIL"


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------
def _specs_from_file(path: str):
    """Load ``aot_specs`` from a Python file (``--specs``: check kernels outside the package)."""
    import importlib.util

    p = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(f"_pxy_aot_specs_{abs(hash(str(p)))}", p)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses & co. look their module up
    spec.loader.exec_module(mod)
    if not hasattr(mod, "aot_specs"):
        raise ValueError(f"{path} defines no aot_specs(profile)")
    return p.stem, mod.aot_specs


def collect_specs(profile, kernels: list[str] | None = None, specs_file: str | None = None) -> list[tuple[str, dict]]:
    """``[(module name, spec)]`` for every kernel module (or only ``specs_file``); ``kernels``
    filters by spec name, module name (short or full) or a prefix of the spec name."""
    out = []
    if specs_file:
        name, fn = _specs_from_file(specs_file)
        out = [(name, s) for s in fn(profile)]
    else:
        for short, fn in KERNEL_SPECS.items():
            out.extend((f"portable_xy.triton_kernels.{short}", spec) for spec in fn(profile))
    if kernels:
        want = set(kernels)

        def keep(modname: str, spec: dict) -> bool:
            short = modname.rsplit(".", 1)[-1]
            name = str(spec["name"])
            return bool({modname, short, name} & want) or any(name.startswith(w) for w in want)

        out = [(m, s) for m, s in out if keep(m, s)]
    return out


def check_compiled_mode() -> None:
    """AOT compilation needs Triton imported in compiled mode: under ``TRITON_INTERPRET=1`` every
    ``@triton.jit`` function -- Triton's own ``tl.cdiv`` & co., created when ``triton`` is first
    imported -- is an interpreter object the compiler cannot lower. Raise a clear error then."""
    import triton.language.standard as std
    from triton.runtime.jit import JITFunction

    probe = getattr(std, "cdiv", None)
    if envs.triton_interpret() or (probe is not None and not isinstance(probe, JITFunction)):
        raise RuntimeError(
            "aot-report needs a process where triton was imported WITHOUT TRITON_INTERPRET=1 (Triton creates its "
            "@jit helpers at import time); run `portable-xy kernels aot-report` (it clears the variable) or a "
            "subprocess without it"
        )


# ---------------------------------------------------------------------------------------------
# compile + inspect
# ---------------------------------------------------------------------------------------------
def _nvidia_bin(tool: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    if path.is_file():
        return str(path)
    found = shutil.which(tool)
    if found:
        return found
    raise FileNotFoundError(f"{tool} not found in {path.parent} nor on PATH")


def _full_signature(fn, signature: dict, constexprs: dict) -> dict:
    names = list(fn.arg_names)
    unknown = (set(signature) | set(constexprs)) - set(names)
    if unknown:
        raise ValueError(f"{fn.__name__}: spec names unknown args {sorted(unknown)}")
    sig = {}
    for n in names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n in signature:
            sig[n] = signature[n]
        else:
            raise ValueError(f"{fn.__name__}: arg {n!r} has neither a signature type nor a constexpr value")
    return sig


def _make_source(spec: dict):
    import triton
    from triton.compiler import ASTSource

    fn = spec["fn"]
    constexprs = dict(spec.get("constexprs") or {})
    sig = _full_signature(fn, spec["signature"], constexprs)
    div16 = set(spec.get("divisible_by_16") or ())
    # Pointers from torch allocations are 16-byte aligned at run time, which the JIT specializes
    # on; mirror that so the AOT binary matches what actually runs.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if sig[n] != "constexpr" and (sig[n].startswith("*") or n in div16)
    }
    try:
        return ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    except TypeError:  # Triton <= 3.2: constants=..., attrs as an AttrsDescriptor; skip the hints
        _ = triton
        return ASTSource(fn=fn, signature=sig, constants=constexprs)


def _parse_resource_usage(text: str) -> dict[str, int]:
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        return {}
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack_bytes": stack, "smem_static": shared, "local_bytes": local}


def _parse_ptxas_log(text: str) -> dict[str, int]:
    out = {}
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if m:
        out["stack_bytes"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", text)
    if m:
        out["registers"] = int(m.group(1))
    return out


def _count_sass(text: str) -> dict[str, int]:
    counts = dict.fromkeys(SASS_OPS, 0)
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)[.\s;]", line)
        if m and m.group(1) in counts:
            counts[m.group(1)] += 1
    return counts


_DOT_RE = re.compile(r"(?:tt\.dot|warp_group_dot|tt\.dot_scaled)\b.*->\s*tensor<([0-9x]+)x[a-z]")


def _dot_m_tiles(ttgir: str) -> list[int]:
    tiles = []
    for line in ttgir.splitlines():
        m = _DOT_RE.search(line)
        if m:
            dims = [int(d) for d in m.group(1).split("x")]
            if len(dims) >= 2:
                tiles.append(dims[-2])
    return tiles


def _rerun_ptxas(ptx: str, cc: int) -> str:
    """Fallback for Triton versions without the ptxas-log knob: run ptxas -v on the PTX again."""
    m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)
    gpu = m.group(1) if m else f"sm_{cc}"
    tools = ["ptxas-blackwell", "ptxas"] if cc >= 90 else ["ptxas"]
    for tool in tools:
        try:
            ptxas = _nvidia_bin(tool)
        except FileNotFoundError:
            continue
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "k.ptx"
            src.write_text(ptx)
            r = subprocess.run(
                [ptxas, "-v", "-lineinfo", f"--gpu-name={gpu}", str(src), "-o", str(Path(d) / "k.o")],
                capture_output=True,
                text=True,
            )
            if r.returncode == 0:
                return r.stderr + r.stdout
    return ""


def _config_label(spec: dict) -> str:
    """Short label: numeric constexprs (not unit strides), flags that are on, warps and stages."""
    parts = []
    for k, v in (spec.get("constexprs") or {}).items():
        if isinstance(v, bool):
            if v:
                parts.append(k)
        elif isinstance(v, (int, float, str)) and not (k.startswith("stride") and v == 1):
            parts.append(f"{k}={v}")
    parts.append(f"w{spec.get('num_warps', 4)}s{spec.get('num_stages', 3)}")
    return " ".join(parts)


def compile_spec(spec: dict, arch: str, module: str = "", cache_dir: str | None = None) -> KernelReport:
    """Compile one spec for ``arch`` and inspect the cubin. Never raises for a kernel error: the
    error lands in the report as a FAIL."""
    import triton
    from triton.backends.compiler import GPUTarget

    arch = normalize_arch(arch)
    info = ARCHS[arch]
    nw, ns = int(spec.get("num_warps", 4)), int(spec.get("num_stages", 3))
    rep = KernelReport(
        kernel=str(spec["name"]),
        module=module.rsplit(".", 1)[-1],
        arch=arch,
        config=_config_label(spec),
        num_warps=nw,
        num_stages=ns,
        expect_tensor_cores=spec.get("expect_tensor_cores", False),
        smem_limit=info["smem_limit"],
    )
    own_dir = None
    if cache_dir is None:
        own_dir = cache_dir = tempfile.mkdtemp(prefix="pxy_aot_")
    log = io.StringIO()
    try:
        src = _make_source(spec)
        with contextlib.ExitStack() as stack:
            knobs = getattr(triton, "knobs", None)
            if knobs is not None:
                stack.enter_context(knobs.cache.scope())
                knobs.cache.dir = cache_dir
                stack.enter_context(knobs.compilation.scope())
                knobs.compilation.always_compile = True
                if hasattr(knobs, "nvidia") and hasattr(knobs.nvidia, "dump_ptxas_log"):
                    stack.enter_context(knobs.nvidia.scope())
                    knobs.nvidia.dump_ptxas_log = True
            else:  # older Triton: environment variables
                old = {k: os.environ.get(k) for k in ("TRITON_CACHE_DIR", "TRITON_ALWAYS_COMPILE")}
                os.environ["TRITON_CACHE_DIR"] = cache_dir
                os.environ["TRITON_ALWAYS_COMPILE"] = "1"
                stack.callback(
                    lambda: [
                        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v) for k, v in old.items()
                    ]
                )
            stack.enter_context(contextlib.redirect_stdout(log))
            kernel = triton.compile(
                src, target=GPUTarget("cuda", info["cc"], 32), options={"num_warps": nw, "num_stages": ns}
            )
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a report row
        msg = f"{type(e).__name__}: {e}".strip()
        rep.error = msg.splitlines()[0][:300] if msg else type(e).__name__
        rep.problems.append("compile error: " + rep.error)
        if envs.aot_traceback():
            traceback.print_exc()
        return rep
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)
    rep.compiled = True
    md = kernel.metadata
    rep.smem_dynamic = int(getattr(md, "shared", 0) or 0)
    asm = kernel.asm
    cubin = asm["cubin"]
    cuobjdump = _nvidia_bin("cuobjdump")
    with tempfile.TemporaryDirectory(prefix="pxy_cubin_") as d:
        path = Path(d) / f"{rep.kernel}.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True)
        sass = subprocess.run([cuobjdump, "--dump-sass", str(path)], capture_output=True, text=True)
    if res.returncode != 0 or sass.returncode != 0:
        rep.problems.append(f"cuobjdump failed: {(res.stderr or sass.stderr).strip()[:200]}")
    for k, v in _parse_resource_usage(res.stdout).items():
        setattr(rep, k, v)
    ptxas_log = log.getvalue()
    if "spill stores" not in ptxas_log and "ptx" in asm:
        ptxas_log = _rerun_ptxas(asm["ptx"], info["cc"])
    plog = _parse_ptxas_log(ptxas_log)
    rep.spill_stores = plog.get("spill_stores")
    rep.spill_loads = plog.get("spill_loads")
    if rep.registers is None:
        rep.registers = plog.get("registers")
    if "C7511" in ptxas_log:
        rep.warnings.append("ptxas serialized wgmma: not enough registers for the wgmma pipeline (C7511)")
    rep.sass_counts = _count_sass(sass.stdout)
    rep.smem_static = rep.smem_static or 0
    rep.smem_bytes = rep.smem_dynamic + rep.smem_static
    rep.dot_m_tiles = _dot_m_tiles(asm.get("ttgir", "")) if hasattr(asm, "get") else []
    _judge(rep, info)
    return rep


def _judge(rep: KernelReport, info: dict) -> None:
    if rep.spill_stores is None:
        # no ptxas log at all: fall back on SASS local-memory traffic as the spill signal
        st, ld = rep.sass_counts.get("STL", 0), rep.sass_counts.get("LDL", 0)
        if st or ld:
            rep.problems.append(f"local memory traffic in SASS (STL {st}, LDL {ld}): spills")
    elif rep.spill_stores or rep.spill_loads:
        rep.problems.append(f"register spills: {rep.spill_stores} B stored, {rep.spill_loads} B loaded")
    if rep.smem_bytes is not None and rep.smem_bytes > rep.smem_limit:
        rep.problems.append(f"shared memory {rep.smem_bytes} B > {rep.smem_limit} B limit of {rep.arch}")
    sm90 = info["cc"] >= 90
    mma_v2 = rep.sass_counts.get("HMMA", 0) + rep.sass_counts.get("IMMA", 0)
    wgmma = rep.sass_counts.get("HGMMA", 0) + rep.sass_counts.get("IGMMA", 0)
    rep.tensor_core_insns = wgmma if sm90 else mma_v2
    if sm90:
        rep.wgmma_applicable = rep.num_warps % 4 == 0 and any(m % 64 == 0 for m in rep.dot_m_tiles)
    expect = rep.expect_tensor_cores
    if expect:
        if not sm90:
            if not mma_v2:
                rep.problems.append("expected tensor cores but the SASS has no HMMA/IMMA")
        elif wgmma:
            pass
        elif expect == "mma" or not rep.wgmma_applicable:
            if mma_v2:
                rep.tensor_core_insns = mma_v2
                rep.notes.append(
                    "sm_90 uses mma.sync (HMMA), not wgmma: "
                    + ("accepted by spec" if expect == "mma" else f"dot M tiles {rep.dot_m_tiles} not a multiple of 64")
                )
            else:
                rep.problems.append("expected tensor cores but the SASS has no HGMMA/HMMA")
        else:
            rep.problems.append(
                "expected wgmma (HGMMA) on sm_90 but the SASS has none"
                + (f" (HMMA x{mma_v2} instead)" if mma_v2 else "")
            )
    rep.verdict = "FAIL" if rep.problems else ("WARN" if rep.warnings else "OK")


def aot_report(
    archs: list[str], kernels: list[str] | None = None, specs=None, specs_file: str | None = None
) -> list[KernelReport]:
    """Compile every spec for every arch. ``specs``: ``{arch: [(module, spec)]}`` or a callable
    ``profile -> [spec]`` to use instead of the real kernel modules; ``specs_file``: a Python file
    exporting ``aot_specs(profile)``."""
    from portable_xy.backends.profile import load_profile

    check_compiled_mode()
    reports = []
    for arch in archs:
        arch = normalize_arch(arch)
        profile = load_profile("cuda", ARCHS[arch]["profile_arch"])
        if specs is None:
            items = collect_specs(profile, kernels, specs_file)
        elif callable(specs):
            items = [("custom", s) for s in specs(profile)]
        else:
            items = list(specs[arch])
        with tempfile.TemporaryDirectory(prefix="pxy_aot_cache_") as cache:
            for module, spec in items:
                reports.append(compile_spec(spec, arch, module, cache_dir=cache))
    return reports


# ---------------------------------------------------------------------------------------------
# output + CLI
# ---------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    return "-" if v is None else str(v)


def format_table(reports: list[KernelReport]) -> str:
    head = ["arch", "kernel", "config", "regs", "spill st/ld", "stack", "smem B", "limit B", "TC insns", "verdict"]
    rows = []
    for r in reports:
        tc = r.tensor_core_insns
        tc_name = (
            "HGMMA" if r.arch == "sm_90" and (r.sass_counts.get("HGMMA") or r.sass_counts.get("IGMMA")) else "HMMA"
        )
        note = "; ".join(r.problems + r.warnings + r.notes)
        rows.append(
            [
                r.arch,
                r.kernel,
                r.config,
                _fmt(r.registers),
                f"{_fmt(r.spill_stores)}/{_fmt(r.spill_loads)}",
                _fmt(r.stack_bytes),
                _fmt(r.smem_bytes),
                str(r.smem_limit),
                f"{tc} {tc_name}" if (tc or r.expect_tensor_cores) else "- (n/e)",
                r.verdict + (f": {note}" if note else ""),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    n_fail = sum(not r.ok for r in reports)
    n_warn = sum(r.verdict == "WARN" for r in reports)
    lines.append("(TC insns: static count in the SASS; n/e = no tensor cores expected by the spec)")
    lines.append(f"\n{len(reports)} configs: {len(reports) - n_fail} pass ({n_warn} with warnings), {n_fail} fail")
    return "\n".join(lines)


def report_json(reports: list[KernelReport]) -> str:
    import triton

    return json.dumps(
        {
            "triton_version": triton.__version__,
            "ok": all(r.ok for r in reports),
            "reports": [asdict(r) for r in reports],
        },
        indent=2,
        default=str,
    )


def _run_cli(args: argparse.Namespace) -> int:
    if envs.triton_interpret() and "triton" not in sys.modules:
        # compiling needs compiled-mode Triton; nothing imported it yet in this process
        envs.set_triton_interpret(False)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("aot-report needs upstream triton (pip install 'portable-xy[cuda]')", file=sys.stderr)
        return 2
    if not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir():
        print("aot-report needs upstream triton with its NVIDIA backend (not triton-ascend)", file=sys.stderr)
        return 2
    archs = args.arch or ["sm_80", "sm_90"]
    try:
        reports = aot_report(archs, args.kernels, specs_file=args.specs)
    except RuntimeError as e:
        print(f"aot-report: {e}", file=sys.stderr)
        return 2
    if not reports:
        print("no kernel spec matched --kernels", file=sys.stderr)
        return 1
    print(report_json(reports) if args.json else format_table(reports))
    return 0 if all(r.ok for r in reports) else 1


def add_aot_report_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "aot-report",
        help="compile every kernel config for CUDA sm_80/sm_90 without a GPU; report regs/spills/smem/tensor cores",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", action="append", type=normalize_arch, help="sm_80 or sm_90 (repeatable; default both)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--kernels", nargs="+", metavar="NAME", help="only these spec names / modules")
    p.add_argument(
        "--specs", metavar="FILE.py", help="check the aot_specs(profile) of this file instead of the package's"
    )
    p.set_defaults(func=_run_cli)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m portable_xy.tools.aot")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_aot_report_command(sub)
    args = parser.parse_args(["aot-report", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
