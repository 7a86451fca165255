"""Ahead-of-time GPU compilation report: compile every kernel config for NVIDIA (sm_80 / sm_90)
and AMD (gfx942 / gfx90a / gfx1100) GPUs on a machine WITHOUT a GPU and check registers, spills,
on-chip memory and matrix-unit (tensor core / MFMA / WMMA) use.

Every kernel module of ``portable_xy.triton_kernels`` has its configs in
:mod:`portable_xy.tools.aot_specs` (the spec format is described there), asked for under the
profile of the architecture (``load_profile(platform.vendor, arch)``). The architectures come from
the platforms (``Platform.aot_archs``: ``backends/platforms/``); ``--arch`` takes ``sm_80``,
``sm80`` or ``80`` (shown as ``sm_80``) and gfx names as they are. Without ``--arch``: sm_80 and
sm_90.

Each config is compiled with ``triton.compile(ASTSource(...), target=platform.triton_target(arch),
options=...)`` (num_warps, num_stages and the spec's ``options``, as the launch passes them) into
a fresh, throw-away Triton cache (nothing is reused across runs, so a regression cannot hide behind
a cached binary). What is inspected depends on the binary Triton produced:

* CUDA (cubin): Triton's bundled ``cuobjdump`` ``--dump-resource-usage`` (registers, stack, static
  shared, local) and ``--dump-sass`` (HMMA / HGMMA / IMMA / IGMMA counts, local loads/stores);
  ``ptxas -v``'s log gives the exact spill bytes. Shared memory = dynamic (compiled metadata
  ``shared``) + static (cuobjdump ``SHARED``), compared with the opt-in per-block maximum of the
  arch (``CudaPlatform.smem_per_block``: sm_80 166912 B, sm_90 232448 B).
* HIP (hsaco): the AMDGPU assembly Triton keeps (``kernel.asm["amdgcn"]``): its metadata
  (``.vgpr_count``, ``.sgpr_count``, ``.agpr_count``, ``.vgpr_spill_count``, ``.sgpr_spill_count``,
  ``.private_segment_fixed_size`` = scratch, ``.group_segment_fixed_size`` = static LDS), the
  compiler's ``; ScratchSize:`` and ``; Occupancy:`` comments (occupancy = waves per SIMD / EU as
  LLVM computes it from registers; it does not see Triton's dynamic LDS), and instruction counts
  (``v_mfma*``, ``v_wmma*``, ``scratch_load/store*``, and MUBUF spills / reloads where scratch is
  not flat, e.g. gfx90a). LDS = dynamic (metadata ``shared``) + static, compared with the
  profile's ``device.lds_bytes``; the matrix instruction expected is the profile's
  ``device.matrix_core`` (``mfma`` on CDNA: gfx942, gfx90a; ``wmma`` on RDNA3: gfx1100).
  SGPR spills count although they go to VGPR lanes, not memory: they cost VGPRs and instructions.

Verdict FAIL on: a compile error; spills (CUDA: spill stores/loads > 0; HIP: scratch > 0 or VGPR /
SGPR spills > 0); shared memory / LDS over the limit; or a config with ``expect_tensor_cores``
whose binary misses the matrix instruction: HMMA/IMMA on sm_80; HGMMA/IGMMA (wgmma) on sm_90 --
except where wgmma cannot apply (no dot with an M tile that is a multiple of 64, or num_warps not a
multiple of 4), where Triton legitimately emits mma.sync (HMMA) and that is accepted (the report
says so); ``expect_tensor_cores="mma"`` accepts either on sm_90; v_mfma on gfx942 / gfx90a; v_wmma
on gfx1100. WARN (non-fatal): ptxas serialized wgmma for lack of registers (C7511). Notes (OK):
e.g. HMMA used on sm_90 where wgmma cannot apply.

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
from ..backends.platforms import PLATFORMS, Platform
from .aot_specs import KERNEL_SPECS

SASS_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "STL", "LDL")
AMDGCN_OPS = ("v_mfma", "v_wmma", "scratch_store", "scratch_load", "buffer_store_scratch", "buffer_load_scratch")


def _display_name(arch: str) -> str:
    """Profile arch name -> the name the report shows: ``sm80`` -> ``sm_80``; others unchanged."""
    m = re.fullmatch(r"sm(\d+)", arch)
    return f"sm_{m.group(1)}" if m else arch


@dataclass(frozen=True)
class AotArch:
    """One architecture the report compiles for: its platform and profile arch name."""

    name: str  # as shown in the report: sm_80, gfx942
    platform: Platform
    arch: str  # the profile / platform name: sm80, gfx942

    def target(self):
        """Triton's ``GPUTarget`` (imports Triton)."""
        return self.platform.triton_target(self.arch)

    def inspector(self) -> _Inspector:
        """The inspector of the binaries Triton builds for this target: the one whose Triton backend
        (``triton/backends/<dir>``) compiles it (imports Triton). ValueError when no installed
        backend does (e.g. triton-ascend, or a Triton built without that backend)."""
        if self.name not in _INSPECTOR_OF:
            from triton.backends import backends

            target = self.target()
            found = [
                insp
                for insp in INSPECTORS
                if insp.triton_dir in backends and backends[insp.triton_dir].compiler.supports_target(target)
            ]
            if not found:
                dirs = ", ".join(f"backends/{i.triton_dir}" for i in INSPECTORS)
                raise ValueError(
                    f"{self.name}: no installed Triton backend compiles {target} (upstream triton has them in {dirs}; "
                    f"installed: {sorted(backends)})"
                )
            _INSPECTOR_OF[self.name] = found[0]
        return _INSPECTOR_OF[self.name]


_INSPECTOR_OF: dict[str, _Inspector] = {}


# every architecture some platform compiles ahead of time, by display name
ARCHS: dict[str, AotArch] = {
    _display_name(a): AotArch(_display_name(a), p, a) for p in PLATFORMS.values() for a in p.aot_archs
}
DEFAULT_ARCHS = ("sm_80", "sm_90")  # no --arch: what CI has always checked (HIP archs need --arch)


def normalize_arch(arch: str) -> str:
    """``sm_90`` / ``sm90`` / ``90`` -> ``sm_90``; ``gfx942`` -> ``gfx942``."""
    a = str(arch).strip().lower().replace("_", "")
    if a.isdigit():
        a = f"sm{a}"
    key = _display_name(a)
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
    smem_bytes: int | None = None  # shared memory (CUDA) / LDS (HIP), dynamic + static
    smem_limit: int = 0
    sass_counts: dict[str, int] = field(default_factory=dict)
    tensor_core_insns: int = 0
    dot_m_tiles: list[int] = field(default_factory=list)
    wgmma_applicable: bool | None = None
    # every vendor: the profile vendor, the matrix instruction judged (HMMA, HGMMA, v_mfma, v_wmma)
    # and instruction counts of the device ISA (CUDA: the SASS counts again; HIP: amdgcn)
    vendor: str = ""
    matrix_insn: str | None = None
    isa_counts: dict[str, int] = field(default_factory=dict)
    # HIP (amdgcn metadata; None on CUDA): registers per lane, spills, scratch bytes per lane,
    # occupancy in waves per SIMD (EU) as LLVM reports it (registers only, not Triton's dynamic LDS)
    vgprs: int | None = None
    sgprs: int | None = None
    agprs: int | None = None
    vgpr_spills: int | None = None
    sgpr_spills: int | None = None
    scratch_bytes: int | None = None
    occupancy: int | None = None
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
    """Compile one spec for ``arch`` and inspect the binary. Never raises for a kernel error: the
    error lands in the report as a FAIL."""
    import triton

    from ..backends.profile import load_profile

    arch = normalize_arch(arch)
    info = ARCHS[arch]
    target = info.target()
    insp = info.inspector()
    profile = load_profile(info.platform.vendor, info.arch)
    nw, ns = int(spec.get("num_warps", 4)), int(spec.get("num_stages", 3))
    rep = KernelReport(
        kernel=str(spec["name"]),
        module=module.rsplit(".", 1)[-1],
        arch=arch,
        config=_config_label(spec),
        num_warps=nw,
        num_stages=ns,
        expect_tensor_cores=spec.get("expect_tensor_cores", False),
        smem_limit=insp.smem_limit(info, profile),
        vendor=info.platform.vendor,
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
                insp.set_knobs(knobs, stack)
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
            options = {**(spec.get("options") or {}), "num_warps": nw, "num_stages": ns}
            kernel = triton.compile(src, target=target, options=options)
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
    rep.smem_dynamic = int(getattr(kernel.metadata, "shared", 0) or 0)
    asm = kernel.asm
    rep.dot_m_tiles = _dot_m_tiles(asm.get("ttgir", "")) if hasattr(asm, "get") else []
    insp.inspect(kernel, rep, log.getvalue(), target)
    rep.smem_static = rep.smem_static or 0
    rep.smem_bytes = rep.smem_dynamic + rep.smem_static
    if rep.smem_bytes > rep.smem_limit:
        rep.problems.append(f"{insp.smem_name} {rep.smem_bytes} B > {rep.smem_limit} B limit of {rep.arch}")
    insp.judge(rep, target, profile)
    rep.verdict = "FAIL" if rep.problems else ("WARN" if rep.warnings else "OK")
    return rep


class _Inspector:
    """What one kind of Triton binary says about a compiled kernel. :attr:`triton_dir` is the
    Triton backend (``triton/backends/<dir>``) that builds it: the inspector of an architecture is
    the one whose backend compiles the platform's target (:meth:`AotArch.inspector`)."""

    triton_dir: str = ""
    smem_name: str = "shared memory"

    def smem_limit(self, info: AotArch, profile) -> int:
        raise NotImplementedError

    def set_knobs(self, knobs, stack: contextlib.ExitStack) -> None:
        """Compile-time Triton knobs (entered on ``stack``)."""

    def inspect(self, kernel, rep: KernelReport, log: str, target) -> None:
        """Fill ``rep`` from the compiled ``kernel`` (``log``: what compilation printed)."""
        raise NotImplementedError

    def judge(self, rep: KernelReport, target, profile) -> None:
        """Append problems / warnings / notes (spills, matrix instructions)."""
        raise NotImplementedError

    def cells(self, rep: KernelReport) -> dict[str, str]:
        """Table cells: regs, spills, scratch, occ."""
        raise NotImplementedError


class _CubinInspector(_Inspector):
    """NVIDIA cubin: cuobjdump resource usage and SASS, the ptxas -v log."""

    triton_dir = "nvidia"

    def smem_limit(self, info: AotArch, profile) -> int:
        return int(info.platform.smem_per_block(info.arch))

    def set_knobs(self, knobs, stack: contextlib.ExitStack) -> None:
        if hasattr(knobs, "nvidia") and hasattr(knobs.nvidia, "dump_ptxas_log"):
            stack.enter_context(knobs.nvidia.scope())
            knobs.nvidia.dump_ptxas_log = True

    def inspect(self, kernel, rep: KernelReport, log: str, target) -> None:
        asm = kernel.asm
        cuobjdump = _nvidia_bin("cuobjdump")
        with tempfile.TemporaryDirectory(prefix="pxy_cubin_") as d:
            path = Path(d) / f"{rep.kernel}.cubin"
            path.write_bytes(asm["cubin"])
            res = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True)
            sass = subprocess.run([cuobjdump, "--dump-sass", str(path)], capture_output=True, text=True)
        if res.returncode != 0 or sass.returncode != 0:
            rep.problems.append(f"cuobjdump failed: {(res.stderr or sass.stderr).strip()[:200]}")
        for k, v in _parse_resource_usage(res.stdout).items():
            setattr(rep, k, v)
        ptxas_log = log
        if "spill stores" not in ptxas_log and "ptx" in asm:
            ptxas_log = _rerun_ptxas(asm["ptx"], int(target.arch))
        plog = _parse_ptxas_log(ptxas_log)
        rep.spill_stores = plog.get("spill_stores")
        rep.spill_loads = plog.get("spill_loads")
        if rep.registers is None:
            rep.registers = plog.get("registers")
        if "C7511" in ptxas_log:
            rep.warnings.append("ptxas serialized wgmma: not enough registers for the wgmma pipeline (C7511)")
        rep.sass_counts = _count_sass(sass.stdout)
        rep.isa_counts = dict(rep.sass_counts)

    def judge(self, rep: KernelReport, target, profile) -> None:
        _judge_sass(rep, int(target.arch))

    def cells(self, rep: KernelReport) -> dict[str, str]:
        return {
            "regs": _fmt(rep.registers),
            "spills": f"{_fmt(rep.spill_stores)}/{_fmt(rep.spill_loads)} B",
            "scratch": _fmt(rep.stack_bytes),
            "occ": "-",
        }


def _judge_sass(rep: KernelReport, cc: int) -> None:
    if rep.spill_stores is None:
        # no ptxas log at all: fall back on SASS local-memory traffic as the spill signal
        st, ld = rep.sass_counts.get("STL", 0), rep.sass_counts.get("LDL", 0)
        if st or ld:
            rep.problems.append(f"local memory traffic in SASS (STL {st}, LDL {ld}): spills")
    elif rep.spill_stores or rep.spill_loads:
        rep.problems.append(f"register spills: {rep.spill_stores} B stored, {rep.spill_loads} B loaded")
    sm90 = cc >= 90
    mma_v2 = rep.sass_counts.get("HMMA", 0) + rep.sass_counts.get("IMMA", 0)
    wgmma = rep.sass_counts.get("HGMMA", 0) + rep.sass_counts.get("IGMMA", 0)
    rep.tensor_core_insns = wgmma if sm90 else mma_v2
    rep.matrix_insn = "HGMMA" if sm90 and wgmma else "HMMA"
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


# amdgcn kernel metadata (the YAML block after ``amdhsa.kernels:``) and the compiler's comments
_AMD_META_RE = re.compile(
    r"^\s*-?\s*\.(vgpr_count|sgpr_count|agpr_count|vgpr_spill_count|sgpr_spill_count|"
    r"private_segment_fixed_size|group_segment_fixed_size|wavefront_size):\s*(\d+)",
    re.M,
)
_AMD_COMMENT_RE = re.compile(r"^;\s*(ScratchSize|Occupancy|TotalNumVgprs|TotalNumSgprs|NumAgprs):\s*(\d+)", re.M)
_AMD_INSN_RE = re.compile(r"^\s+([a-z][a-z0-9_]*)\b(.*)$")
_AMD_SPILL_COMMENT_RE = re.compile(r";.*\b(?:Spill|Reload)\b")  # LLVM: "; 4-byte Folded Spill"


def _parse_amdgcn(text: str) -> dict[str, int]:
    """Kernel metadata and compiler comments of one kernel's amdgcn assembly (first value wins)."""
    out: dict[str, int] = {}
    for m in _AMD_META_RE.finditer(text):
        out.setdefault(m.group(1), int(m.group(2)))
    for m in _AMD_COMMENT_RE.finditer(text):
        out.setdefault(m.group(1), int(m.group(2)))
    return out


def _count_amdgcn(text: str) -> dict[str, int]:
    """Matrix instructions (``v_mfma*``, ``v_wmma*``) and scratch traffic: flat scratch
    (``scratch_store*`` / ``scratch_load*``: gfx942, gfx1100) and MUBUF spills where scratch is not
    flat (gfx90a: ``buffer_store_dword v2, off, s[96:99], 0 offset:1464 ; 4-byte Folded Spill``;
    told from Triton's own buffer loads/stores by LLVM's spill / reload comment)."""
    counts = dict.fromkeys(AMDGCN_OPS, 0)
    for line in text.splitlines():
        m = _AMD_INSN_RE.match(line)
        if not m:
            continue
        op, rest = m.groups()
        for prefix in ("v_mfma", "v_wmma", "scratch_store", "scratch_load"):
            if op.startswith(prefix):
                counts[prefix] += 1
                break
        else:
            if op.startswith(("buffer_store", "buffer_load")) and _AMD_SPILL_COMMENT_RE.search(rest):
                counts[op.split("_")[0] + "_" + op.split("_")[1] + "_scratch"] += 1
    return counts


class _HsacoInspector(_Inspector):
    """AMD hsaco: the amdgcn assembly's kernel metadata, comments and instructions."""

    triton_dir = "amd"
    smem_name = "LDS"

    def smem_limit(self, info: AotArch, profile) -> int:
        return int(profile.data["device"]["lds_bytes"])

    def inspect(self, kernel, rep: KernelReport, log: str, target) -> None:
        text = kernel.asm.get("amdgcn", "")
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        if not text:
            rep.problems.append("no amdgcn assembly in the compiled kernel")
            return
        meta = _parse_amdgcn(text)
        rep.vgprs = meta.get("vgpr_count", meta.get("TotalNumVgprs"))
        rep.sgprs = meta.get("sgpr_count", meta.get("TotalNumSgprs"))
        rep.agprs = meta.get("agpr_count", meta.get("NumAgprs"))
        rep.registers = rep.vgprs
        rep.vgpr_spills = meta.get("vgpr_spill_count")
        rep.sgpr_spills = meta.get("sgpr_spill_count")
        scratch = [meta[k] for k in ("private_segment_fixed_size", "ScratchSize") if k in meta]
        rep.scratch_bytes = max(scratch) if scratch else None
        rep.occupancy = meta.get("Occupancy")
        rep.smem_static = meta.get("group_segment_fixed_size", 0)
        rep.isa_counts = _count_amdgcn(text)

    def judge(self, rep: KernelReport, target, profile) -> None:
        c = rep.isa_counts
        spill_insns = sum(v for k, v in c.items() if k.startswith(("scratch_", "buffer_")))
        if rep.scratch_bytes or rep.vgpr_spills or rep.sgpr_spills:
            rep.problems.append(
                f"scratch {rep.scratch_bytes} B per lane, spills: {rep.vgpr_spills} VGPRs, {rep.sgpr_spills} SGPRs"
            )
        elif rep.scratch_bytes is None and spill_insns:
            rep.problems.append(f"scratch traffic in the ISA ({spill_insns} instructions): spills")
        kind = str((profile.data.get("device") or {}).get("matrix_core") or "")
        want = [f"v_{kind}"] if kind else ["v_mfma", "v_wmma"]
        rep.matrix_insn = want[0] if len(want) == 1 else "v_mfma/v_wmma"
        rep.tensor_core_insns = sum(c.get(w, 0) for w in want)
        if rep.expect_tensor_cores and not rep.tensor_core_insns:
            other = {k: c[k] for k in ("v_mfma", "v_wmma") if k not in want and c.get(k)}
            rep.problems.append(
                f"expected {rep.matrix_insn} on {rep.arch} but the ISA has none"
                + "".join(f" ({k} x{v} instead)" for k, v in other.items())
            )

    def cells(self, rep: KernelReport) -> dict[str, str]:
        regs = f"{_fmt(rep.vgprs)}v/{_fmt(rep.sgprs)}s" + (f" ({rep.agprs}a)" if rep.agprs else "")
        return {
            "regs": regs,
            "spills": f"{_fmt(rep.vgpr_spills)}v/{_fmt(rep.sgpr_spills)}s",
            "scratch": _fmt(rep.scratch_bytes),
            "occ": _fmt(rep.occupancy),
        }


INSPECTORS: tuple[_Inspector, ...] = (_CubinInspector(), _HsacoInspector())


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
        info = ARCHS[arch]
        profile = load_profile(info.platform.vendor, info.arch)
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
    head = ["arch", "kernel", "config", "regs", "spills", "scratch", "smem/LDS B", "limit B", "occ", "matrix insns",
            "verdict"]  # fmt: skip
    rows = []
    for r in reports:
        cells = ARCHS[r.arch].inspector().cells(r) if r.arch in ARCHS else {}
        tc = r.tensor_core_insns
        note = "; ".join(r.problems + r.warnings + r.notes)
        rows.append(
            [
                r.arch,
                r.kernel,
                r.config,
                cells.get("regs", _fmt(r.registers)),
                cells.get("spills", "-"),
                cells.get("scratch", "-"),
                _fmt(r.smem_bytes),
                str(r.smem_limit),
                cells.get("occ", "-"),
                f"{tc} {r.matrix_insn or ''}".rstrip() if (tc or r.expect_tensor_cores) else "- (n/e)",
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
    lines.append(
        "(regs: per thread (CUDA) / VGPRs v, SGPRs s, AGPRs a per lane (HIP); spills: bytes stored/loaded (CUDA) / "
        "spilled VGPRs/SGPRs (HIP); scratch: stack (CUDA) / scratch bytes per lane (HIP); occ: waves per SIMD as "
        "the AMD compiler reports it; matrix insns: static count in the SASS / amdgcn; n/e = none expected by "
        "the spec)"
    )
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
    archs = args.arch or list(DEFAULT_ARCHS)
    for arch in dict.fromkeys(archs):
        try:  # the arch's Triton backend (backends/nvidia for sm_*, backends/amd for gfx*) is installed
            ARCHS[arch].inspector()
        except Exception as e:  # noqa: BLE001 - e.g. triton-ascend: no GPU backends at all
            print(f"aot-report needs upstream triton: {e}", file=sys.stderr)
            return 2
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


def _arch_arg(arch: str) -> str:
    try:
        return normalize_arch(arch)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_aot_report_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "aot-report",
        help="compile every kernel config for NVIDIA (sm_80/sm_90) or AMD (gfx942/gfx90a/gfx1100) GPUs without a "
        "GPU; report registers/spills/shared memory or LDS/occupancy/tensor cores (MFMA, WMMA)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--arch",
        action="append",
        type=_arch_arg,
        help=f"one of {', '.join(ARCHS)} (sm80 / 80 are sm_80; repeatable; default: {' and '.join(DEFAULT_ARCHS)})",
    )
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
