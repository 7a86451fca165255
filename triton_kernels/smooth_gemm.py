"""SmoothGEMM: ``y[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N])`` for any M from a fixed tile menu.

Torch reference: ``portable_xy.backends.cpu.linear_ref``.

XY-Serve (section 6) optimises a *small fixed set* of GEMM tiles instead of autotuning every
shape, and maps each run-time M onto them by **virtual padding**: a tile is always computed in
full, but only its real rows are read from / written to global memory (masked loads with
``other=0`` and masked stores). No zero-padded copy of ``x`` is ever made. Because row ``i`` of
``y`` depends only on row ``i`` of ``x``, the padding rows cannot influence real rows.

Shapes and layouts
    x      [M, K]  fp16 / bf16 / fp32, any strides (row-major is fastest)
    weight [N, K]  same dtype (PyTorch ``nn.Linear`` layout: one output feature per row)
    bias   [N]     optional, same dtype
    y      [M, N]  x.dtype, row-major (allocated here, or any-strided ``out``)
    Accumulation is always fp32; fp32 inputs use IEEE products unless the profile sets
    ``gemm.fp32_precision: tf32``.

Kernel constexprs
    BLOCK_M, BLOCK_N, BLOCK_K  the tile (from the profile's ``gemm.tiles`` menu)
    GROUP_M     grouped ("swizzled") tile order for L2 reuse: GROUP_M row-tiles share each
                column sweep (1 = plain row-major order over tiles); profile ``gemm.group_m``
    HAS_BIAS    fuse the bias add
    EVEN_K      K % BLOCK_K == 0: the K loop needs no mask
    FP32_IEEE   fp32 operands: ``tl.dot(..., input_precision="ieee")``
    PERSISTENT  grid = ``num_programs`` programs (the profile's core count on Ascend), each
                looping over tiles ``pid, pid + num_programs, ...``; otherwise one program/tile

Tile plans (host side, :func:`plan_gemm`)
    A plan splits the M rows into at most ``gemm.max_segments`` (default 2) consecutive
    *segments*, each run by one launch with one menu tile: every segment but the last covers a
    whole number of its tiles (no padding), the last one pads its final tile. So a plan never
    pads more than one tile per tail (padding < BLOCK_M of the tail tile). Example with menu
    BLOCK_M in {16, 64} and M = 300: 256 rows on 64-row tiles + 44 rows on 16-row tiles (4 rows
    of virtual padding) instead of 5 x 64 (20 rows) or 19 x 16 (more, smaller tiles).

    Cost model (an analytic roofline per wave; XY-Serve profiles offline instead, so a tuned
    profile may replace this by listing fewer tiles). For a segment of R rows on tile
    (BM, BN, BK) and C = ``num_cores``::

        tiles  = ceil(R / BM) * ceil(N / BN)          waves = ceil(tiles / C)
        per wave: t = max(2 * BM * BN * K / (peak_flops / C),           # padded rows ARE computed
                          w * (rows_w + BN) * K * bytes / bw(w))        # but never read (selective read)
                  bw(w) = min(peak_bw, w * core_bw_share * peak_bw / C)  # few busy cores pull less
        segment time = sum over waves of (t + tile_overhead) + launch_overhead
    where ``w`` is the number of tiles in the wave and ``rows_w`` the real rows of a tile;
    ``core_bw_share`` (default 2: one core can pull twice its fair share of HBM bandwidth) is an
    assumption, settable in ``gemm.core_bw_share``; ``gemm.tile_overhead_us`` (prologue, pipeline
    fill, epilogue of one tile) and ``gemm.launch_overhead_us`` are profile data too. Plans within
    2 % of the cheapest count as equal; among those the fewest executed MACs (least padding), then
    the fewest segments win.
    Peaks come from the profile's ``device`` section (neutral defaults when absent). Plans are
    cached per (M, N, K, dtype size) and profile.

Bit-exactness across batch sizes
    Within a launch rows never interact. Across launches with different tiles, row ``i`` gets the
    same bits iff the tiles share BLOCK_K (same K-block order, fp32 accumulation) and the dot
    instruction accumulates each element in a shape-independent way: true under the Triton
    interpreter (tested: row ``i`` for M = 1 equals row ``i`` for M = 300). All shipped menus share
    one BLOCK_K per profile (:func:`menu_problems` checks it). On GPUs different BLOCK_M can pick
    different MMA instructions (mma.sync for 16/32 rows, wgmma for >= 64 on sm90), whose internal
    rounding is not documented to agree, so hardware bit-exactness across M is NOT claimed.

Plans expose ``useful_macs`` (M*N*K) and ``executed_macs`` (every launched tile in full,
including padded rows, columns and K tail) for the padding-efficiency analysis.

Compiled-code notes (Triton 3.9 AOT, see :func:`aot_specs`): every CUDA menu tile compiles to
HMMA (sm80) / HGMMA (sm90, BLOCK_M >= 64) without spills *given* 16-aligned pointers, N, K and
row strides (what the JIT specialises on for model shapes); without those hints the loads are
scalar and the 64x128 / 128x256 tiles spill. The PERSISTENT variant needs more registers (the
128x256 tile spills on sm90), which is why only the Ascend profiles turn it on. fp32 operands
use FMA (no tensor cores) and can spill on sm80 (32x64x64: 48 B): fp32 is for CPU/interpreter
parity, not GPU speed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------------
# kernel
# ------------------------------------------------------------------------------------------------


@triton.jit
def _gemm_tile(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    tile_id,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, FP32_IEEE: tl.constexpr,
):  # fmt: skip
    # grouped tile order: GROUP_M row-tiles sweep the columns together
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (tile_id // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group_size) % group_m
    pid_n = (tile_id % group_size) // group_m
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N

    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M - row0  # virtual padding: rows past M are never read or written
    mask_n = rn < N - col0
    # 64-bit scalar tile bases, 32-bit in-tile offsets
    a_ptrs = x_ptr + row0.to(tl.int64) * stride_xm + (rm[:, None] * stride_xm + rk[None, :] * stride_xk)
    b_ptrs = w_ptr + col0.to(tl.int64) * stride_wn + (rk[:, None] * stride_wk + rn[None, :] * stride_wn)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = rk < K - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if FP32_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias = tl.load(b_ptr + col0 + rn, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + row0.to(tl.int64) * stride_ym + col0.to(tl.int64) * stride_yn
    y_ptrs += rm[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def smooth_gemm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    num_programs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, FP32_IEEE: tl.constexpr, PERSISTENT: tl.constexpr,
):  # fmt: skip
    """One segment of a plan: ``y[:M] = x[:M] @ w^T (+ b)`` on BLOCK_M x BLOCK_N output tiles."""
    pid = tl.program_id(0)
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile_id in tl.range(pid, num_tiles, num_programs):
            _gemm_tile(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                       stride_ym, stride_yn, tile_id, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, HAS_BIAS, EVEN_K,
                       FP32_IEEE)  # fmt: skip
    else:
        _gemm_tile(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                   stride_ym, stride_yn, pid, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, HAS_BIAS, EVEN_K,
                   FP32_IEEE)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# tile menu and plans
# ------------------------------------------------------------------------------------------------

_BLOCK_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


@dataclass(frozen=True)
class GemmTile:
    """One menu entry. ``options`` are launch/compile options passed through to the launch:
    ``num_warps``/``num_stages`` on CUDA, ``multibuffer`` & co. on Ascend."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> GemmTile:
        missing = [k for k in _BLOCK_KEYS if k not in d]
        if missing:
            raise ValueError(f"gemm tile {d} lacks {missing}")
        opts = tuple(sorted((k, v) for k, v in d.items() if k not in _BLOCK_KEYS))
        return cls(int(d["BLOCK_M"]), int(d["BLOCK_N"]), int(d["BLOCK_K"]), opts)

    @property
    def launch_options(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def num_warps(self) -> int:
        return int(self.launch_options.get("num_warps", 4))

    @property
    def num_stages(self) -> int:
        return int(self.launch_options.get("num_stages", 2))

    @property
    def name(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K}"

    def live_bytes(self, elem_bytes: int = 2) -> int:
        """On-chip bytes live at once: one A and one B tile (inputs) plus the fp32 accumulator.
        The Ascend compiler double-buffers the inputs itself, so this must stay within half the
        unified buffer (``onchip.live_budget_bytes``, 96 KB on 910B)."""
        bm, bn, bk = self.BLOCK_M, self.BLOCK_N, self.BLOCK_K
        return (bm * bk + bn * bk) * elem_bytes + bm * bn * 4


@dataclass(frozen=True)
class GemmSegment:
    """Rows ``m_start : m_start + m_rows`` computed by one launch of ``tile``."""

    m_start: int
    m_rows: int
    tile: GemmTile
    tiles_m: int
    tiles_n: int
    programs: int  # launched grid size (== tiles unless persistent)

    @property
    def num_tiles(self) -> int:
        return self.tiles_m * self.tiles_n

    @property
    def padded_rows(self) -> int:
        return self.tiles_m * self.tile.BLOCK_M - self.m_rows


@dataclass(frozen=True)
class GemmPlan:
    M: int
    N: int
    K: int
    segments: tuple[GemmSegment, ...]
    num_cores: int
    persistent: bool
    group_m: int
    est_time_s: float = 0.0
    candidates: int = field(default=0, compare=False)

    @property
    def useful_macs(self) -> int:
        return self.M * self.N * self.K

    @property
    def executed_macs(self) -> int:
        """MACs the tiles perform, padding included (rows, N tail, K tail)."""
        total = 0
        for s in self.segments:
            t = s.tile
            k_pad = math.ceil(self.K / t.BLOCK_K) * t.BLOCK_K
            total += s.tiles_m * t.BLOCK_M * s.tiles_n * t.BLOCK_N * k_pad
        return total

    @property
    def efficiency(self) -> float:
        return self.useful_macs / self.executed_macs if self.executed_macs else 1.0

    @property
    def padded_rows(self) -> int:
        return sum(s.padded_rows for s in self.segments)

    @property
    def waves(self) -> int:
        return sum(math.ceil(s.num_tiles / self.num_cores) for s in self.segments)

    def describe(self) -> str:
        segs = " + ".join(f"{s.m_rows}r@{s.tile.name}" for s in self.segments)
        return (f"M={self.M} N={self.N} K={self.K}: {segs} | waves={self.waves} pad_rows={self.padded_rows} "
                f"eff={self.efficiency:.3f}")  # fmt: skip


def menu(profile) -> list[GemmTile]:
    tiles = [GemmTile.from_dict(t) for t in profile.gemm["tiles"]]
    if not tiles:
        raise ValueError("profile gemm.tiles is empty")
    return tiles


def menu_problems(profile, elem_bytes: int = 2) -> list[str]:
    """Static checks of a profile's tile menu: ``tl.dot`` needs dims >= 16, tiles are powers of
    two, one BLOCK_K for the whole menu (bit-exact rows across plans), and -- where the profile
    has an ``onchip`` section (Ascend) -- 16-element alignment and the live-tile budget."""
    out = []
    tiles = menu(profile)
    for t in tiles:
        for k in _BLOCK_KEYS:
            v = getattr(t, k)
            if v < 16 or v & (v - 1):
                out.append(f"{t.name}: {k}={v} must be a power of two >= 16")
    if len({t.BLOCK_K for t in tiles}) > 1:
        out.append(f"menu mixes BLOCK_K {sorted({t.BLOCK_K for t in tiles})}: rows would differ across plans")
    onchip = profile.data.get("onchip")
    if onchip:
        budget = int(onchip.get("live_budget_bytes", 0))
        align = int(onchip.get("align_elems", 16))
        for t in tiles:
            if budget and t.live_bytes(elem_bytes) > budget:
                out.append(f"{t.name}: {t.live_bytes(elem_bytes)} live bytes > budget {budget}")
            if any(getattr(t, k) % align for k in _BLOCK_KEYS):
                out.append(f"{t.name}: not {align}-element aligned")
    return out


def _device_peaks(profile, elem_bytes: int) -> tuple[float, float, float]:
    """(flops/s, bytes/s, launch overhead s) from the profile's ``device`` section."""
    dev = profile.data.get("device") or {}
    tf = dev.get("peak_tflops") or {}
    key = {2: "fp16", 4: "fp32"}.get(elem_bytes, "fp16")
    tflops = float(tf.get(key) or tf.get("fp16") or 1.0)
    gbps = float(dev.get("peak_gbps") or 100.0)
    overhead_us = float(profile.gemm.get("launch_overhead_us", 5.0))
    return tflops * 1e12, gbps * 1e9, overhead_us * 1e-6


def _segment_cost(rows, N, K, tile, cores, flops, bw, elem_bytes, share, tile_oh) -> tuple[float, int, int]:
    tiles_m = math.ceil(rows / tile.BLOCK_M)
    tiles_n = math.ceil(N / tile.BLOCK_N)
    total = tiles_m * tiles_n
    t_compute = 2.0 * tile.BLOCK_M * tile.BLOCK_N * K / (flops / cores)
    real_rows = min(tile.BLOCK_M, rows / tiles_m)  # selective read: average real rows per tile
    full, last = divmod(total, cores)
    t = 0.0
    for in_wave, count in ((cores, full), (last, 1 if last else 0)):
        if count:
            wave_bw = min(bw, in_wave * share * bw / cores)
            t_mem = in_wave * (real_rows + tile.BLOCK_N) * K * elem_bytes / wave_bw
            t += count * (max(t_compute, t_mem) + tile_oh)
    return t, tiles_m, tiles_n


def _chains(tiles: list[GemmTile], max_segments: int):
    """Tile sequences with strictly decreasing BLOCK_M (body first, tail last)."""
    by_m = sorted(tiles, key=lambda t: -t.BLOCK_M)

    def rec(start, prefix):
        if prefix:
            yield list(prefix)
        if len(prefix) == max_segments:
            return
        for i in range(start, len(by_m)):
            t = by_m[i]
            if prefix and t.BLOCK_M >= prefix[-1].BLOCK_M:
                continue
            yield from rec(i + 1, prefix + [t])

    yield from rec(0, [])


_PLAN_CACHE: dict[tuple, GemmPlan] = {}


def _profile_key(profile) -> str:
    key = getattr(profile, "_smooth_gemm_key", None)
    if key is None:
        payload = {"gemm": profile.gemm, "device": profile.data.get("device"), "cores": profile.num_cores}
        key = json.dumps(payload, sort_keys=True, default=str)
        try:
            profile._smooth_gemm_key = key
        except AttributeError:
            pass
    return key


def plan_from_tiles(M: int, N: int, K: int, tiles, profile, elem_bytes: int = 2) -> GemmPlan | None:
    """The plan that runs ``tiles`` (menu entries or dicts) body first: every tile but the last
    takes as many whole tiles of rows as fit, the last one takes the rest (padding its final
    tile). None when a body tile would get no rows. Costed with the module's model."""
    tiles = [GemmTile.from_dict(t) if isinstance(t, dict) else t for t in tiles]
    g = profile.gemm
    cores = max(1, int(profile.num_cores))
    persistent = bool(g.get("persistent", False))
    flops, bw, overhead = _device_peaks(profile, elem_bytes)
    share = float(g.get("core_bw_share", 2.0))
    tile_oh = float(g.get("tile_overhead_us", 0.5)) * 1e-6
    segs, start, cost, rest = [], 0, 0.0, M
    for i, tile in enumerate(tiles):
        rows = rest if i == len(tiles) - 1 else (rest // tile.BLOCK_M) * tile.BLOCK_M
        if rows == 0:
            if M == 0:
                break
            return None
        t, tm, tn = _segment_cost(rows, N, K, tile, cores, flops, bw, elem_bytes, share, tile_oh)
        progs = min(cores, tm * tn) if persistent else tm * tn
        segs.append(GemmSegment(start, rows, tile, tm, tn, progs))
        cost += t + overhead
        start, rest = start + rows, rest - rows
    return GemmPlan(M, N, K, tuple(segs), cores, persistent, int(g.get("group_m", 1)), cost)


def plan_gemm(M: int, N: int, K: int, profile, elem_bytes: int = 2) -> GemmPlan:
    """Pick (and cache) the tile plan for an ``[M, K] x [N, K]^T`` GEMM; see the module doc."""
    if M < 0 or N <= 0 or K <= 0:
        raise ValueError(f"bad GEMM shape M={M} N={N} K={K}")
    ck = (_profile_key(profile), M, N, K, elem_bytes)
    plan = _PLAN_CACHE.get(ck)
    if plan is not None:
        return plan
    max_segments = max(1, int(profile.gemm.get("max_segments", 2)))
    cands = []
    for chain in _chains(menu(profile), max_segments):
        cand = plan_from_tiles(M, N, K, chain, profile, elem_bytes)
        if cand is not None:  # None: a body tile got no rows (a shorter chain is the same plan)
            cands.append(cand)
    cheapest = min(c.est_time_s for c in cands)
    near = [c for c in cands if c.est_time_s <= cheapest * 1.02]
    best = min(near, key=lambda c: (c.executed_macs, len(c.segments), c.est_time_s))
    best = dataclasses.replace(best, candidates=len(cands))
    _PLAN_CACHE[ck] = best
    return best


def single_tile_plan(M: int, N: int, K: int, tile: GemmTile | dict, profile, elem_bytes: int = 2) -> GemmPlan:
    """A plan that runs all M rows on one given tile (tests and tile sweeps)."""
    return plan_from_tiles(M, N, K, [tile], profile, elem_bytes)


# ------------------------------------------------------------------------------------------------
# host entry point
# ------------------------------------------------------------------------------------------------


def launch_kwargs(options: dict) -> dict:
    """Launch/compile options for ``kernel[grid](...)``; none under the interpreter (upstream's
    ignores them, but triton-ascend 3.2.0's rejects anything beyond num_warps & co., e.g.
    ``multibuffer``)."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        return {}
    return dict(options)


def smooth_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    profile=None,
    plan: GemmPlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias)`` -> ``[..., N]`` in x.dtype, using ``plan`` or the
    cached plan of ``profile`` for this shape. ``out``: optional ``[M, N]`` destination (any
    strides; only its first M rows and N columns are written)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x has K={x.shape[-1]} but weight is {tuple(weight.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"linear: dtypes differ (x {x.dtype}, weight {weight.dtype})")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = weight.shape[0]
    if out is None:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        if out.shape != (M, N) or out.dtype != x.dtype:
            raise ValueError(f"out must be [{M}, {N}] {x.dtype}, got {tuple(out.shape)} {out.dtype}")
        y = out
    if M == 0:
        return y.reshape(*lead, N)
    if plan is None:
        if profile is None:
            raise ValueError("smooth_gemm needs a profile or a plan")
        plan = plan_gemm(M, N, K, profile, x.element_size())
    elif (plan.M, plan.N, plan.K) != (M, N, K):
        raise ValueError(f"plan is for {(plan.M, plan.N, plan.K)}, got {(M, N, K)}")
    fp32_ieee = x.dtype == torch.float32 and (profile is None or profile.gemm.get("fp32_precision", "ieee") == "ieee")
    b = bias if bias is not None else y
    for s in plan.segments:
        xs = x2[s.m_start : s.m_start + s.m_rows]
        ys = y[s.m_start : s.m_start + s.m_rows]
        t = s.tile
        smooth_gemm_kernel[(s.programs,)](
            xs, weight, b, ys, s.m_rows, N, K,
            xs.stride(0), xs.stride(1), weight.stride(0), weight.stride(1), ys.stride(0), ys.stride(1),
            s.programs,
            BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K, GROUP_M=plan.group_m,
            HAS_BIAS=bias is not None, EVEN_K=K % t.BLOCK_K == 0, FP32_IEEE=fp32_ieee,
            PERSISTENT=plan.persistent, **launch_kwargs(t.launch_options),
        )  # fmt: skip
    return y.reshape(*lead, N)


# ------------------------------------------------------------------------------------------------
# ahead-of-time specs
# ------------------------------------------------------------------------------------------------

_TRITON_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_dtypes(profile) -> list[torch.dtype]:
    dts = [torch.float16]
    if (profile.data.get("supports") or {}).get("bf16", True):
        dts.append(torch.bfloat16)
    return dts


def aot_specs(profile) -> list[dict]:
    """One compile spec per (menu tile, half-precision dtype): generic M, no bias, K a multiple of
    BLOCK_K and N, K, row strides multiples of 16 (model sizes are), unit inner strides.
    ``signature`` lists every
    kernel argument (constexprs as ``"constexpr"``, as ``triton.compiler.ASTSource`` wants in
    Triton >= 3.3); ``constexprs`` gives their values."""
    specs = []
    persistent = bool(profile.gemm.get("persistent", False))
    for dt in aot_dtypes(profile):
        ty = _TRITON_TY[dt]
        for t in menu(profile):
            cx = dict(BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K,
                      GROUP_M=int(profile.gemm.get("group_m", 1)), HAS_BIAS=False, EVEN_K=True,
                      FP32_IEEE=False, PERSISTENT=persistent)  # fmt: skip
            # unit strides are specialised to constexpr 1 by the JIT at run time: mirror that
            cx.update(stride_xk=1, stride_wk=1, stride_yn=1)
            sig = {"x_ptr": f"*{ty}", "w_ptr": f"*{ty}", "b_ptr": f"*{ty}", "y_ptr": f"*{ty}"}
            sig.update({k: "i32" for k in ("M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "num_programs")})
            sig.update({k: "constexpr" for k in cx})
            specs.append(dict(
                name=f"smooth_gemm_{ty}_{t.name}", fn=smooth_gemm_kernel, signature=sig, constexprs=cx,
                num_warps=t.num_warps, num_stages=t.num_stages, expect_tensor_cores=True,
                divisible_by_16=["N", "K", "stride_xm", "stride_wn", "stride_ym"],
                options={k: v for k, v in t.options if k not in ("num_warps", "num_stages")},
            ))  # fmt: skip
    return specs
