"""Weight-only quantized SmoothGEMM (W4A16 / W8A16): ``y[M, N] = x[M, K] @ dequant(W)^T (+ bias[N])``.

Torch reference: ``portable_xy.backends.quant.dequantize_ref`` (the weight oracle) followed by
``x.float() @ w.T (+ bias)``.

The weight format is :class:`portable_xy.backends.quant.QuantWeight` (GGUF's Q4_0 / Q4_1 / Q8_0
repacked once at load)::

    w[n, 32 b + j] = d[n, b] * q[n, 32 b + j] + m[n, b]          (fp32)

Weights are dequantized **in registers**, one K tile at a time, straight from ``qs`` / ``d`` /
``m``; no dequantized copy of the weight ever exists in memory. Tiles and M-planning are
SmoothGEMM's (:mod:`.smooth_gemm`, :mod:`.gemm_plan`): a fixed tile menu, virtual padding (masked
loads with ``other=0`` and masked stores, never a padded copy of ``x``), optional grouped tile
order and persistent grids.

Shapes and layouts
    x      [M, K]      fp16 / bf16 / fp32, any strides (row-major is fastest); K % 32 == 0
    qs     [N, K / 2]  uint8 (4 bits: byte ``16 b + j`` of a row holds element ``32 b + j`` in its
                       low nibble and ``32 b + j + 16`` in its high nibble) or [N, K] (8 bits);
                       unit inner stride, any row stride
    d, m   [N, K / 32] fp16, unit inner stride, any row stride
    bias   [N]         optional, x.dtype
    y      [M, N]      x.dtype (allocated here, or any-strided ``out``)
    Accumulation is fp32. Each dequantized weight ``d * q + m`` is computed in fp32 and rounded
    once to x.dtype before the dot (fp32 inputs: ``tl.dot(..., input_precision="ieee")`` unless
    the profile sets ``gemm.fp32_precision: tf32``).

Unpacking without tensor shifts (the Ascend Triton dialect takes only scalar shift amounts)
    A K tile of BLOCK_K elements is ``G = BLOCK_K / 32`` whole scale groups (BLOCK_K must be a
    multiple of 32: ``tl.static_assert``), walked group by group (``tl.static_range(G)``), so a
    group's scale and min are plain ``[BLOCK_N]`` vectors broadcast along K (no reshapes, few
    registers). For 4 bits a group's 16 bytes per weight row are one ``[16, BLOCK_N]`` uint8 tile;
    ``byte & 0xF`` gives the low half-block (elements ``32 g + j``) and ``byte >> 4`` the high
    half-block (``32 g + 16 + j``), both with scalar shift amounts. Instead of interleaving them
    back, ``x`` is loaded as the two matching ``[BLOCK_M, 16]`` column runs and the group is two
    dots into one accumulator: ``acc += x_lo @ w_lo + x_hi @ w_hi``. A dot sums over K in any
    order, so this is the same GEMM. 8 bits: one ``[32, BLOCK_N]`` tile and one dot per group.

Two variants, one kernel (:func:`quant_gemm_kernel`)
    tiled    (``SPLIT=False``) M > ``quant_gemm.small_m.max_m``: the SmoothGEMM plan of
             :func:`.gemm_plan.plan_gemm` over the ``quant_gemm.tiles`` menu, one launch per
             segment, each program a BLOCK_M x BLOCK_N output tile over all of K.
    split-K  (``SPLIT=True``) decode-sized M (``<= small_m.max_m``, 16 by default): a single
             small tile (``small_m.tile``) leaves most cores idle on an N-tile grid, so K is also
             cut into ``split_k`` ranges of ``k_per_split`` (a multiple of BLOCK_K). Each program
             writes an fp32 partial tile to a workspace ``[split_k, M, N]``; then
             :func:`split_k_reduce_kernel` sums the partials in split order (deterministic, no
             atomics: triton-ascend's interpreter has no fp16 atomics either), adds the bias and
             casts. ``split_k`` is chosen so that ``tiles * split_k`` fills about
             ``num_cores * small_m.waves`` programs, at most ``small_m.max_split_k`` and never more
             than the K tiles; ``split_k == 1`` runs the kernel straight into ``y``.

Kernel constexprs
    BLOCK_M, BLOCK_N, BLOCK_K  the tile; BLOCK_K % 32 == 0
    GROUP_M     grouped tile order (profile ``quant_gemm.group_m``, else ``gemm.group_m``)
    BITS        4 or 8 (``qs`` layout above)
    HAS_BIAS    fuse the bias add (tiled and ``split_k == 1`` only; else the reduce adds it)
    EVEN_K      K % BLOCK_K == 0: no K mask (K tails are whole 32-groups, masked by group)
    FP32_IEEE   fp32 operands: exact fp32 products
    PERSISTENT  grid = ``num_programs`` programs looping over tiles (Ascend profiles)
    SPLIT       write fp32 partials of a K range to the workspace instead of the output

Profile (``quant_gemm`` section, merged like ``gemm``: default < vendor < arch < tuned)
    ``tiles`` (the tiled menu), ``small_m: {max_m, tile, max_split_k, waves}``; every other
    planner key (group_m, persistent, max_segments, overheads, fp32_precision) is taken from
    ``quant_gemm`` where set, else from ``gemm``. The planner's roofline is SmoothGEMM's and counts
    weight bytes as x.dtype's (it overestimates weight traffic by 2-4x, so it leans to smaller
    tiles than a quantization-aware model would).

What is verified (tests/kernels/test_quant_gemm.py under the interpreters of upstream Triton 3.9
and 3.6 and of triton-ascend 3.2.0; tests/test_aot.py and scripts/triton36_check.sh compile for
CUDA with Triton 3.9 and 3.6)
    * Against ``dequantize_ref`` + an fp32 matmul with fresh random inputs, for Q4_0, Q4_1 and
      Q8_0, fp32 (atol/rtol 1e-4) and fp16 (atol/rtol 1e-2) inputs, with and without bias, M in
      1, 3, 17, 65, N not a multiple of BLOCK_N, K a multiple of 32 but not of BLOCK_K (and
      smaller than BLOCK_K), on every tile of the interpreter menu and every distinct tile of the
      shipped CUDA / Ascend profiles, tiled and split-K (split_k 1..3, uneven last split,
      persistent grids), into NaN-poisoned outputs; rows past M are neither read nor written.
    * The tests are sharp enough to see the classic bugs: outputs computed with swapped nibble
      halves or without ``m`` are far outside the tolerance (checked in the tests).
    * ``portable-xy kernels aot-report``: the shipped sm_80 / sm_90 configs (tiled menu, split-K
      tile, 4 and 8 bits, fp16 and bf16, the reduce kernel) compile without spills; tiles with
      BLOCK_M >= 64 use HMMA (sm_80) / HGMMA (sm_90), 16-row tiles HMMA.
    NOT verified here: bf16 numerics (the interpreters have no bf16; bf16 only compiles), real
    GPU / NPU runs and their speed, and triton-ascend's compiler (it needs CANN).
    Rows are independent of other rows within a variant; the split-K and tiled variants sum K in
    different orders, so a row's bits may differ between them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..backends.quant import QBLOCK, QuantWeight
from .gemm_plan import GemmPlan, GemmTile, plan_gemm
from .launch import launch_kwargs, launch_options, support_programs

# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _quant_tile(
    x_ptr, q_ptr, d_ptr, m_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_qn, stride_dn, stride_mn, stride_ym, stride_yn,
    k_per_split, tile_id,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, FP32_IEEE: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    # tile id -> (K split, output tile); grouped order within a split
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_mn = num_pid_m * num_pid_n
    split = tile_id // num_mn
    mn = tile_id % num_mn
    group_size = GROUP_M * num_pid_n
    first_m = (mn // group_size) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (mn % group_size) % group_m
    pid_n = (mn % group_size) // group_m
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)

    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    mask_m = rm < M - row0  # virtual padding: rows past M are never read or written
    mask_n = rn < N - col0
    GROUPS: tl.constexpr = BLOCK_K // 32  # scale groups per K tile
    # x columns / qs bytes of one 32-group: 4 bits: 16 bytes, whose low nibbles are elements
    # j = 0..15 of the group and high nibbles 16 + j; 8 bits: 32 bytes, one per element
    QROWS: tl.constexpr = 16 if BITS == 4 else 32
    jq = tl.arange(0, QROWS)
    a_ptrs = x_ptr + row0.to(tl.int64) * stride_xm + k_start.to(tl.int64) * stride_xk
    a_ptrs += rm[:, None] * stride_xm + jq[None, :] * stride_xk
    q_ptrs = q_ptr + col0.to(tl.int64) * stride_qn + (k_start // 32) * QROWS
    q_ptrs += jq[:, None] + rn[None, :] * stride_qn
    d_ptrs = d_ptr + col0.to(tl.int64) * stride_dn + k_start // 32 + rn * stride_dn
    m_ptrs = m_ptr + col0.to(tl.int64) * stride_mn + k_start // 32 + rn * stride_mn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for g in tl.static_range(GROUPS):  # one 32-group: its scale and min are [BLOCK_N] vectors
            if EVEN_K:
                mask_a = mask_m[:, None]
                mask_w = mask_n[None, :]
                mask_s = mask_n
            else:
                # K is whole 32-groups, so a group is all inside K or all outside: compare its
                # first element kg. (Vector compares: in upstream's interpreter, tensor & scalar
                # bool does not give an int1 mask.)
                kg = k0 + g * 32
                mask_a = mask_m[:, None] & (kg + jq[None, :] < k_end)
                mask_w = (kg + jq[:, None] < k_end) & mask_n[None, :]
                mask_s = mask_n & (kg + 0 * rn < k_end)
            dv = tl.load(d_ptrs + g, mask=mask_s, other=0.0).to(tl.float32)[None, :]
            mv = tl.load(m_ptrs + g, mask=mask_s, other=0.0).to(tl.float32)[None, :]
            qb = tl.load(q_ptrs + g * QROWS, mask=mask_w, other=0)
            a_lo = tl.load(a_ptrs + g * 32 * stride_xk, mask=mask_a, other=0.0)
            if BITS == 4:
                qi = qb.to(tl.int32)
                w_lo = ((qi & 0xF).to(tl.float32) * dv + mv).to(x_ptr.dtype.element_ty)  # elements j
                w_hi = ((qi >> 4).to(tl.float32) * dv + mv).to(x_ptr.dtype.element_ty)  # elements 16 + j
                a_hi = tl.load(a_ptrs + (g * 32 + 16) * stride_xk, mask=mask_a, other=0.0)
                if FP32_IEEE:
                    acc = tl.dot(a_lo, w_lo, acc, input_precision="ieee")
                    acc = tl.dot(a_hi, w_hi, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a_lo, w_lo, acc)
                    acc = tl.dot(a_hi, w_hi, acc)
            else:
                w = (qb.to(tl.float32) * dv + mv).to(x_ptr.dtype.element_ty)
                if FP32_IEEE:
                    acc = tl.dot(a_lo, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a_lo, w, acc)
        a_ptrs += BLOCK_K * stride_xk
        q_ptrs += GROUPS * QROWS
        d_ptrs += GROUPS
        m_ptrs += GROUPS

    mask_y = mask_m[:, None] & mask_n[None, :]
    if SPLIT:  # fp32 partial of this K range: workspace [num_splits, M, N], contiguous
        ws = y_ptr + (split.to(tl.int64) * M + row0) * N + col0
        tl.store(ws + (rm[:, None] * N + rn[None, :]), acc, mask=mask_y)
    else:
        if HAS_BIAS:
            bias = tl.load(b_ptr + col0 + rn, mask=mask_n, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        y_ptrs = y_ptr + row0.to(tl.int64) * stride_ym + col0.to(tl.int64) * stride_yn
        y_ptrs += rm[:, None] * stride_ym + rn[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)


@triton.jit
def quant_gemm_kernel(
    x_ptr, q_ptr, d_ptr, m_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_qn, stride_dn, stride_mn, stride_ym, stride_yn,
    k_per_split, num_splits, num_programs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, FP32_IEEE: tl.constexpr,
    PERSISTENT: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """``y[:M] = x[:M] @ dequant(q, d, m)^T (+ b)`` on BLOCK_M x BLOCK_N tiles, K range
    ``[s * k_per_split, (s + 1) * k_per_split)`` for split ``s`` of ``num_splits`` (tiled: one
    split of all K). ``SPLIT``: ``y_ptr`` is the fp32 workspace ``[num_splits, M, N]``."""
    tl.static_assert(BLOCK_K % 32 == 0, "a K tile must cover whole 32-element scale groups")
    tl.static_assert(BITS == 4 or BITS == 8, "4- or 8-bit quants")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tl.dot needs tile dims >= 16")
    pid = tl.program_id(0)
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N) * num_splits
        for tile_id in tl.range(pid, num_tiles, num_programs):
            _quant_tile(x_ptr, q_ptr, d_ptr, m_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_qn,
                        stride_dn, stride_mn, stride_ym, stride_yn, k_per_split, tile_id, BLOCK_M, BLOCK_N,
                        BLOCK_K, GROUP_M, BITS, HAS_BIAS, EVEN_K, FP32_IEEE, SPLIT)  # fmt: skip
    else:
        _quant_tile(x_ptr, q_ptr, d_ptr, m_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_qn,
                    stride_dn, stride_mn, stride_ym, stride_yn, k_per_split, pid, BLOCK_M, BLOCK_N,
                    BLOCK_K, GROUP_M, BITS, HAS_BIAS, EVEN_K, FP32_IEEE, SPLIT)  # fmt: skip


@triton.jit
def split_k_reduce_kernel(
    ws_ptr, b_ptr, y_ptr, M, N, num_splits, split_stride, stride_ym, stride_yn, num_programs,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """``y[r, c] = sum_s ws[s, r, c] (+ b[c])`` in split order, cast to y's dtype. Tasks are
    (row, BLOCK_N columns); program ``pid`` does tasks ``pid, pid + num_programs, ...``."""
    pid = tl.program_id(0)
    n_cb = tl.cdiv(N, BLOCK_N)
    cols = tl.arange(0, BLOCK_N)
    for task in tl.range(pid, M * n_cb, num_programs):
        row = task // n_cb
        c0 = (task % n_cb) * BLOCK_N
        mask = cols < N - c0
        p = ws_ptr + row.to(tl.int64) * N + c0 + cols
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for _ in range(0, num_splits):
            acc += tl.load(p, mask=mask, other=0.0)
            p += split_stride
        if HAS_BIAS:
            acc += tl.load(b_ptr + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        y = y_ptr + row.to(tl.int64) * stride_ym + (c0 + cols) * stride_yn
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# plans (host side)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitKPlan:
    """The small-M plan: all M rows on one ``tile``, K cut into ``split_k`` ranges of
    ``k_per_split`` (the last one may be shorter)."""

    M: int
    N: int
    K: int
    tile: GemmTile
    split_k: int
    k_per_split: int
    tiles_m: int
    tiles_n: int
    programs: int
    persistent: bool
    group_m: int

    @property
    def num_tiles(self) -> int:
        return self.tiles_m * self.tiles_n * self.split_k

    @property
    def useful_macs(self) -> int:
        return self.M * self.N * self.K

    @property
    def executed_macs(self) -> int:
        t = self.tile
        return self.tiles_m * t.BLOCK_M * self.tiles_n * t.BLOCK_N * math.ceil(self.K / t.BLOCK_K) * t.BLOCK_K

    def describe(self) -> str:
        return (f"M={self.M} N={self.N} K={self.K}: split-K {self.split_k} x {self.k_per_split} @ {self.tile.name} "
                f"| tiles={self.num_tiles} programs={self.programs}")  # fmt: skip


def quant_section(profile) -> dict:
    """The profile's ``quant_gemm`` section (empty when it has none)."""
    return dict(profile.data.get("quant_gemm") or {})


def tiled_profile(profile):
    """``profile`` with ``gemm`` = the ``gemm`` section overlaid by ``quant_gemm`` (its menu and
    any planner keys it sets), for :func:`.gemm_plan.plan_gemm`. Cached on the profile."""
    view = getattr(profile, "_quant_gemm_view", None)
    if view is not None:
        return view
    q = quant_section(profile)
    if not q.get("tiles"):
        raise ValueError("profile has no quant_gemm.tiles menu")
    gemm = {**profile.gemm, **{k: v for k, v in q.items() if k != "small_m"}}
    view = dataclasses.replace(profile, data={**profile.data, "gemm": gemm})
    try:
        profile._quant_gemm_view = view
    except AttributeError:
        pass
    return view


def quant_live_bytes(tile: GemmTile, elem_bytes: int = 2) -> int:
    """Estimated on-chip bytes live at once in one K step: the x tile and the dequantized weight
    tile in x.dtype, one fp32 dequantization temporary of the weight tile, and the fp32
    accumulator (the uint8 codes and fp16 scales are smaller than their dequantized forms and
    assumed fused into it). The Ascend budget rule of :meth:`GemmTile.live_bytes` applies."""
    bm, bn, bk = tile.BLOCK_M, tile.BLOCK_N, tile.BLOCK_K
    return (bm * bk + bn * bk) * elem_bytes + bk * bn * 4 + bm * bn * 4


def quant_menu_problems(profile, elem_bytes: int = 2) -> list[str]:
    """Static checks of the ``quant_gemm`` menu and small-M tile: SmoothGEMM's menu rules, BLOCK_K
    a multiple of 32, and -- with an ``onchip`` section (Ascend) -- :func:`quant_live_bytes`
    within the live budget."""
    from .gemm_plan import menu_problems

    view = tiled_profile(profile)
    out = menu_problems(view, elem_bytes)
    tiles = [GemmTile.from_dict(t) for t in view.gemm["tiles"]]
    small = quant_section(profile).get("small_m") or {}
    if small.get("tile"):
        tiles.append(GemmTile.from_dict(small["tile"]))
    budget = int((profile.data.get("onchip") or {}).get("live_budget_bytes", 0))
    for t in tiles:
        if t.BLOCK_K % QBLOCK:
            out.append(f"{t.name}: BLOCK_K={t.BLOCK_K} is not a multiple of {QBLOCK} (whole scale groups)")
        if min(t.BLOCK_M, t.BLOCK_N, t.BLOCK_K) < 16 or any(v & (v - 1) for v in (t.BLOCK_M, t.BLOCK_N, t.BLOCK_K)):
            out.append(f"{t.name}: tile dims must be powers of two >= 16")
        if budget and quant_live_bytes(t, elem_bytes) > budget:
            out.append(f"{t.name}: ~{quant_live_bytes(t, elem_bytes)} live bytes > budget {budget}")
    return out


def split_k_plan(M: int, N: int, K: int, profile, split_k: int | None = None, tile=None) -> SplitKPlan:
    """The split-K plan for ``M`` rows on ``tile`` (default ``quant_gemm.small_m.tile``);
    ``split_k`` None: chosen from the core count (see the module doc), else clamped to the K tiles."""
    small = quant_section(profile).get("small_m") or {}
    tile = tile if tile is not None else small.get("tile")
    if tile is None:
        raise ValueError("profile has no quant_gemm.small_m.tile")
    tile = GemmTile.from_dict(tile) if isinstance(tile, dict) else tile
    view = tiled_profile(profile)
    cores = max(1, int(profile.num_cores))
    tiles_m, tiles_n = math.ceil(M / tile.BLOCK_M), math.ceil(N / tile.BLOCK_N)
    k_tiles = math.ceil(K / tile.BLOCK_K)
    if split_k is None:
        target = cores * max(1, int(small.get("waves", 1)))
        split_k = min(int(small.get("max_split_k", 8)), math.ceil(target / (tiles_m * tiles_n)))
    split_k = max(1, min(int(split_k), k_tiles))
    k_per_split = math.ceil(k_tiles / split_k) * tile.BLOCK_K
    split_k = math.ceil(K / k_per_split)  # no empty split
    persistent = bool(view.gemm.get("persistent", False))
    n = tiles_m * tiles_n * split_k
    return SplitKPlan(M, N, K, tile, split_k, k_per_split, tiles_m, tiles_n, min(cores, n) if persistent else n,
                      persistent, int(view.gemm.get("group_m", 1)))  # fmt: skip


def plan_quant_gemm(M: int, N: int, K: int, profile, elem_bytes: int = 2) -> GemmPlan | SplitKPlan:
    """Split-K for ``M <= quant_gemm.small_m.max_m``, else SmoothGEMM's plan over the
    ``quant_gemm.tiles`` menu (cached by :func:`.gemm_plan.plan_gemm`)."""
    small = quant_section(profile).get("small_m") or {}
    if small.get("tile") and 0 < M <= int(small.get("max_m", 0)):
        return split_k_plan(M, N, K, profile)
    return plan_gemm(M, N, K, tiled_profile(profile), elem_bytes)


# ------------------------------------------------------------------------------------------------
# host entry point
# ------------------------------------------------------------------------------------------------


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def quant_linear(
    x: torch.Tensor,
    w: QuantWeight,
    bias: torch.Tensor | None = None,
    profile=None,
    plan: GemmPlan | SplitKPlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K] @ dequant(w)^T (+ bias)`` -> ``[..., N]`` in x.dtype, on ``plan`` (a tiled
    :class:`GemmPlan` over the quant menu or a :class:`SplitKPlan`) or the plan
    :func:`plan_quant_gemm` picks from ``profile``. ``out``: optional ``[M, N]`` destination (any
    strides; only its first M rows and N columns are written)."""
    N, K = w.n, w.k
    if w.qtype not in ("q4_0", "q4_1", "q8_0"):
        raise ValueError(f"quant_linear: unsupported quantization type {w.qtype!r}")
    if x.shape[-1] != K:
        raise ValueError(f"quant_linear: x has K={x.shape[-1]} but the weight is [{N}, {K}]")
    if K % QBLOCK:
        raise ValueError(f"quant_linear: K={K} is not a multiple of {QBLOCK}")
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (N,)):
        raise TypeError(f"quant_linear: bias must be [{N}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    per_row = K * w.bits // 8
    if tuple(w.qs.shape) != (N, per_row) or w.qs.dtype != torch.uint8:
        raise ValueError(f"quant_linear: qs must be uint8 [{N}, {per_row}], got {tuple(w.qs.shape)} {w.qs.dtype}")
    for name, t in (("d", w.d), ("m", w.m)):
        if tuple(t.shape) != (N, K // QBLOCK) or t.dtype != torch.float16:
            raise ValueError(f"quant_linear: {name} must be fp16 [{N}, {K // QBLOCK}], got {tuple(t.shape)} {t.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
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
            raise ValueError("quant_linear needs a profile or a plan")
        plan = plan_quant_gemm(M, N, K, profile, x.element_size())
    elif (plan.M, plan.N, plan.K) != (M, N, K):
        raise ValueError(f"plan is for {(plan.M, plan.N, plan.K)}, got {(M, N, K)}")
    precision = "ieee" if profile is None else tiled_profile(profile).gemm.get("fp32_precision", "ieee")
    fp32_ieee = x.dtype == torch.float32 and precision == "ieee"
    qs, d, m = _inner_contiguous(w.qs), _inner_contiguous(w.d), _inner_contiguous(w.m)
    b = bias if bias is not None else y
    common = dict(GROUP_M=plan.group_m, BITS=w.bits, FP32_IEEE=fp32_ieee, PERSISTENT=plan.persistent)

    if isinstance(plan, SplitKPlan):
        t = plan.tile
        opts = launch_kwargs(t.launch_options)
        split = plan.split_k > 1
        dst = torch.empty((plan.split_k, M, N), dtype=torch.float32, device=x.device) if split else y
        quant_gemm_kernel[(plan.programs,)](
            x2, qs, d, m, b, dst, M, N, K,
            x2.stride(0), x2.stride(1), qs.stride(0), d.stride(0), m.stride(0), y.stride(0), y.stride(1),
            plan.k_per_split, plan.split_k, plan.programs,
            BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K, HAS_BIAS=bias is not None and not split,
            EVEN_K=K % t.BLOCK_K == 0, SPLIT=split, **common, **opts,
        )  # fmt: skip
        if split:
            block = min(triton.next_power_of_2(N), 1024)
            n_tasks = M * triton.cdiv(N, block)
            progs = support_programs(n_tasks, profile) if profile is not None else n_tasks
            split_k_reduce_kernel[(progs,)](
                dst, b, y, M, N, plan.split_k, M * N, y.stride(0), y.stride(1), progs,
                BLOCK_N=block, HAS_BIAS=bias is not None,
                **(launch_options(profile) if profile is not None else {}),
            )  # fmt: skip
        return y.reshape(*lead, N)

    for s in plan.segments:
        xs = x2[s.m_start : s.m_start + s.m_rows]
        ys = y[s.m_start : s.m_start + s.m_rows]
        t = s.tile
        quant_gemm_kernel[(s.programs,)](
            xs, qs, d, m, b, ys, s.m_rows, N, K,
            xs.stride(0), xs.stride(1), qs.stride(0), d.stride(0), m.stride(0), ys.stride(0), ys.stride(1),
            K, 1, s.programs,
            BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K, HAS_BIAS=bias is not None,
            EVEN_K=K % t.BLOCK_K == 0, SPLIT=False, **common, **launch_kwargs(t.launch_options),
        )  # fmt: skip
    return y.reshape(*lead, N)
