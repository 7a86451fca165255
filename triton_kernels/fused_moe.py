"""Fused MoE: top-k softmax routing and the routed experts' SwiGLU MLPs as grouped GEMMs over a
task table, for any token count, on SmoothGEMM's tile menu with per-expert tile plans.

Torch reference: ``portable_xy.backends.reference.moe_route_ref`` and ``fused_moe_ref``::

    weights, ids = topk(softmax(logits.float()), k)   (/ their sum when renormalising)
    out[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))   e = ids[t, j]

Shapes and layouts
    router_logits [T, E_all]     any float dtype, any strides
    topk_weights  [T, k]         fp32 (any float dtype is read as fp32)
    topk_ids      [T, k]         int32 / int64 (global expert ids)
    x             [T, H]         fp16 / bf16 / fp32, any strides
    w13           [E, 2I, H]     x.dtype, gate rows first (``nn.Linear`` layout per expert), any
                                 strides; or a stacked :class:`~portable_xy.backends.quant.QuantWeight`
                                 (``qs [E, 2I, H * bits / 8]``, ``d``/``m [E, 2I, H / 32]``, unit
                                 inner strides; H % 32 == 0)
    w2            [E, H, I]      likewise (quantized: I % 32 == 0)
    out           [T, H]         x.dtype
    Experts ``expert_start .. expert_start + E - 1`` are local; other ids contribute nothing.

Flow of :func:`fused_moe` (host plan: :mod:`.moe_plan`): 3 to 5 launches, no padded copies
    1. plan: the ``T * k`` assignments sorted by local expert (``sorted_ids``, slots ``t * k + j``)
       and, per expert, SmoothGEMM's tile plan of its row count -> a task table per GEMM, one
       launch per menu tile used (BLOCK_M/N/K are constexprs; typically 1-2 launches per GEMM).
    2. gate-up GEMM + SiLU-and-mul (``GATE_UP``): program = (task, column tile); its rows are
       gathered from ``x`` through ``sorted_ids`` (row ``slot // k``), so no permuted or padded
       copy of the activations exists. A BLOCK_N weight tile holds BLOCK_N / 2 gate rows and the
       matching BLOCK_N / 2 up rows of ``w13`` interleaved (:func:`_weight_rows`), so one dot
       fills one accumulator (SmoothGEMM's registers) with each output column's gate and up sums
       side by side; the epilogue splits them and stores ``silu(gate) * up`` (fp32, rounded once
       to x.dtype) as ``act [A, I]`` in sorted order. No ``[A, 2I]`` intermediate exists.
    3. down GEMM: reads ``act`` rows contiguously, multiplies the fp32 accumulator by the routing
       weight of each row's slot, rounds to x.dtype and scatters sorted row ``r`` to row
       ``sorted_ids[r]`` of ``y [T * k, H]``.
    4. combine (:func:`moe_combine_kernel`): ``out[t] = sum_j [ids[t, j] local] y[t * k + j]``
       summed in fp32 in slot order ``j = 0 .. k-1`` (slots of non-local experts are never written
       and never read), cast to x.dtype. Deterministic: no atomics, a fixed summation order.
    Virtual padding: every task masks rows past its real row count (only an expert's last tile
    has such rows); padded rows are computed but never read from or written to memory.
    The plan reads the per-expert counts on the host (one device -> host copy per call), so a
    call is not capturable in a CUDA graph.

Quantized experts (W4A16 / W8A16, ``QUANT_BITS`` 4 or 8)
    The weights are dequantized in registers one 32-group at a time with :mod:`.quant_gemm`'s
    scheme (:func:`_quant_group_dot`; 4 bits: low / high nibble halves as two dots, scalar shift
    amounts only; 8 bits: one dot); tiles and
    per-expert plans come from the ``quant_gemm.tiles`` menu (no split-K: the experts' tasks give
    the grid its parallelism).

Routing (:func:`moe_route_kernel`)
    A program takes BLOCK_T tokens x all experts (BLOCK_E >= E, masked), computes the fp32
    softmax, then ``k`` rounds of (row max, lowest expert index holding it, knock it out): the
    weights come out in descending order like ``torch.topk``; equal probabilities go to the
    lowest expert id first (``torch.topk`` does not specify its tie order, so exact ties may
    order differently from it). Renormalisation divides by the sum of the chosen weights.

Kernel constexprs
    BLOCK_M, BLOCK_N, BLOCK_K  the task's menu tile;  GROUP_M  grouped task order (``gemm.group_m``)
    TOP_K       k;  GATE_UP  the gate-up GEMM with the SwiGLU epilogue (else the down GEMM)
    EVEN_K      K % BLOCK_K == 0;  FP32_IEEE  exact fp32 dots;  PERSISTENT  grid = cores, task loop
    QUANT_BITS  4 / 8 (quantized kernel)
    BLOCK_T, BLOCK_E / BLOCK_H  routing / combine tiles (tokens x experts / columns)

What is verified (tests/kernels/test_fused_moe.py under the interpreters of Triton 3.9 and 3.6 and
of triton-ascend 3.2)
    * fp32 / fp16 against ``fused_moe_ref`` (quantized experts: on ``dequantize_ref`` weights),
      NaN-poisoned outputs, for T = 1 ... 4096, H and I not tile multiples, one expert holding
      every row, empty experts, k = E, expert-parallel ranks, every tile of the interpreter menus
      and of the CUDA / Ascend profiles (persistent grids); routing against ``moe_route_ref``.
    * ``portable-xy kernels aot-report``: every config compiles without spills, within shared
      memory / LDS and with tensor-core / MFMA / WMMA instructions for sm_80, sm_90, gfx942,
      gfx90a and gfx1100 (Triton 3.9).
    NOT verified here: bf16 numerics (the interpreters have no bf16; bf16 only compiles), real
    GPU / NPU runs and their speed, and triton-ascend's compiler (it needs CANN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends.quant import QBLOCK, QuantWeight
from .gemm_plan import GemmTile
from .launch import launch_kwargs, launch_options, support_programs
from .moe_plan import TASK_FIELDS, MoEGemmPlan, MoEPlan, plan_moe
from .quant_gemm import tiled_profile

TASK_WIDTH = tl.constexpr(len(TASK_FIELDS))
TILE_ELEMS = 4096  # routing and combine tiles: BLOCK_T x BLOCK_E (BLOCK_H) <= this, BLOCK_T <= 64

# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _task_rows(
    tasks_ptr, ids_ptr, num_tasks, N, tile_id,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, COLS: tl.constexpr, GROUP_M: tl.constexpr, GATE_UP: tl.constexpr,
):  # fmt: skip
    """Tile ``tile_id`` of a launch -> (expert, first output column, row mask, A rows, output rows,
    slots). Grouped order: GROUP_M tasks (consecutive tasks share an expert) sweep the N tiles."""
    num_pid_n = tl.cdiv(N, COLS)
    group_size = GROUP_M * num_pid_n
    first_m = (tile_id // group_size) * GROUP_M
    group_m = tl.minimum(num_tasks - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group_size) % group_m
    pid_n = (tile_id % group_size) // group_m
    task = tasks_ptr + pid_m * TASK_WIDTH
    expert = tl.load(task)
    row0 = tl.load(task + 1)
    n_rows = tl.load(task + 2)
    rm = tl.arange(0, BLOCK_M)
    mask_m = rm < n_rows  # virtual padding: rows past the expert's count are never read or written
    sorted_row = row0 + rm
    slot = tl.load(ids_ptr + sorted_row, mask=mask_m, other=0)  # assignment t * TOP_K + j
    if GATE_UP:  # gather token rows of x, write sorted rows
        a_row = slot // TOP_K
        y_row = sorted_row
    else:  # read sorted rows, scatter to slots
        a_row = sorted_row
        y_row = slot
    return expert, pid_n * COLS, mask_m, a_row.to(tl.int64), y_row.to(tl.int64), slot


@triton.jit
def _dot(a, b, acc, FP32_IEEE: tl.constexpr):
    if FP32_IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _weight_rows(N, col0, BLOCK_N: tl.constexpr, GATE_UP: tl.constexpr):
    """The weight rows of a tile's BLOCK_N columns, relative to row ``col0``, and their mask.
    GATE_UP interleaves gate and up rows: column ``2c`` is gate row ``c``, column ``2c + 1`` up
    row ``N + c`` (N = I), so each output column's gate and up sums sit side by side in the
    accumulator (one dot, one accumulator: SmoothGEMM's register footprint)."""
    rn = tl.arange(0, BLOCK_N)
    if GATE_UP:
        return (rn % 2) * N + rn // 2, rn // 2 < N - col0
    else:
        return rn, rn < N - col0


@triton.jit
def _store_rows(
    acc, y_ptr, rw_ptr, slot, y_row, mask_m, col0, N, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATE_UP: tl.constexpr,
):  # fmt: skip
    """The epilogue: ``silu(gate) * up`` of the interleaved columns (GATE_UP) or the routing
    weight times the tile (down), in fp32, rounded once to y's dtype, stored to the real rows."""
    if GATE_UP:
        COLS: tl.constexpr = BLOCK_N // 2
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, COLS, 2)))
        out = gate / (1.0 + tl.exp(-gate)) * up
    else:
        COLS: tl.constexpr = BLOCK_N
        out = acc * tl.load(rw_ptr + slot, mask=mask_m, other=0.0)[:, None]
    rn = tl.arange(0, COLS)
    mask_n = rn < N - col0
    y_ptrs = y_ptr + col0.to(tl.int64) * stride_yn + (y_row[:, None] * stride_ym + rn[None, :] * stride_yn)
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _moe_gemm_tile(
    a_ptr, w_ptr, y_ptr, ids_ptr, tasks_ptr, rw_ptr, num_tasks, N, K,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_ym, stride_yn, tile_id,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, GATE_UP: tl.constexpr, EVEN_K: tl.constexpr, FP32_IEEE: tl.constexpr,
):  # fmt: skip
    COLS: tl.constexpr = BLOCK_N // 2 if GATE_UP else BLOCK_N  # output columns of a tile
    expert, col0, mask_m, a_row, y_row, slot = _task_rows(
        tasks_ptr, ids_ptr, num_tasks, N, tile_id, TOP_K, BLOCK_M, COLS, GROUP_M, GATE_UP)  # fmt: skip
    wrow, mask_n = _weight_rows(N, col0, BLOCK_N, GATE_UP)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (a_row[:, None] * stride_am + rk[None, :] * stride_ak)
    # a 64-bit scalar base, 32-bit offsets inside one expert's weight
    w_base = w_ptr + expert.to(tl.int64) * stride_we + col0.to(tl.int64) * stride_wn
    b_ptrs = w_base + (rk[:, None] * stride_wk + wrow[None, :] * stride_wn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = rk < K - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, b, acc, FP32_IEEE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_wk
    _store_rows(acc, y_ptr, rw_ptr, slot, y_row, mask_m, col0, N, stride_ym, stride_yn, BLOCK_M, BLOCK_N, GATE_UP)


@triton.jit
def moe_gemm_kernel(
    a_ptr, w_ptr, y_ptr, ids_ptr, tasks_ptr, rw_ptr, num_tasks, N, K,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_ym, stride_yn, num_programs,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, GATE_UP: tl.constexpr, EVEN_K: tl.constexpr, FP32_IEEE: tl.constexpr,
    PERSISTENT: tl.constexpr,
):  # fmt: skip
    """One launch of a grouped GEMM over its ``num_tasks`` tasks ``(expert, row0, rows)`` x output
    column tiles. ``GATE_UP``: ``y[sorted rows, :N] = silu(x[tokens] @ w[e, :N]^T) * (x[tokens] @
    w[e, N:2N]^T)`` (a BLOCK_N tile = BLOCK_N / 2 gate + BLOCK_N / 2 up weight rows); else
    ``y[slots] = weight[slots] * a[sorted rows] @ w[e]^T``."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_K >= 16, "tl.dot needs tile dims >= 16")
    tl.static_assert(BLOCK_N >= (32 if GATE_UP else 16), "tl.dot needs tile dims >= 16 (gate-up: BLOCK_N / 2)")
    pid = tl.program_id(0)
    if PERSISTENT:
        num_tiles = num_tasks * tl.cdiv(N, BLOCK_N // 2 if GATE_UP else BLOCK_N)
        for tile_id in tl.range(pid, num_tiles, num_programs):
            _moe_gemm_tile(a_ptr, w_ptr, y_ptr, ids_ptr, tasks_ptr, rw_ptr, num_tasks, N, K, stride_am, stride_ak,
                           stride_we, stride_wn, stride_wk, stride_ym, stride_yn, tile_id, TOP_K, BLOCK_M, BLOCK_N,
                           BLOCK_K, GROUP_M, GATE_UP, EVEN_K, FP32_IEEE)  # fmt: skip
    else:
        _moe_gemm_tile(a_ptr, w_ptr, y_ptr, ids_ptr, tasks_ptr, rw_ptr, num_tasks, N, K, stride_am, stride_ak,
                       stride_we, stride_wn, stride_wk, stride_ym, stride_yn, pid, TOP_K, BLOCK_M, BLOCK_N,
                       BLOCK_K, GROUP_M, GATE_UP, EVEN_K, FP32_IEEE)  # fmt: skip


@triton.jit
def _quant_group_dot(
    acc, a_lo, a_hi, q_ptrs, d_ptrs, m_ptrs, mask_w, mask_s,
    QUANT_BITS: tl.constexpr, FP32_IEEE: tl.constexpr,
):  # fmt: skip
    """``acc += a @ dequant(group)^T`` for one 32-group of weights, :mod:`.quant_gemm`'s scheme:
    4 bits: the group's 16 bytes per weight row as two halves, low nibbles (elements j, times
    ``a_lo``) and high nibbles (16 + j, times ``a_hi``), scalar shift amounts only; 8 bits: one
    32-row tile times ``a_lo`` (``a_hi`` unused)."""
    dv = tl.load(d_ptrs, mask=mask_s, other=0.0).to(tl.float32)[None, :]
    mv = tl.load(m_ptrs, mask=mask_s, other=0.0).to(tl.float32)[None, :]
    qb = tl.load(q_ptrs, mask=mask_w, other=0)
    if QUANT_BITS == 4:
        qi = qb.to(tl.int32)
        acc = _dot(a_lo, ((qi & 0xF).to(tl.float32) * dv + mv).to(a_lo.dtype), acc, FP32_IEEE)
        acc = _dot(a_hi, ((qi >> 4).to(tl.float32) * dv + mv).to(a_hi.dtype), acc, FP32_IEEE)
    else:
        acc = _dot(a_lo, (qb.to(tl.float32) * dv + mv).to(a_lo.dtype), acc, FP32_IEEE)
    return acc


@triton.jit
def _moe_quant_tile(
    a_ptr, q_ptr, d_ptr, m_ptr, y_ptr, ids_ptr, tasks_ptr, rw_ptr, num_tasks, N, K,
    stride_am, stride_ak, stride_qe, stride_qn, stride_de, stride_dn, stride_me, stride_mn,
    stride_ym, stride_yn, tile_id,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, QUANT_BITS: tl.constexpr, GATE_UP: tl.constexpr, EVEN_K: tl.constexpr,
    FP32_IEEE: tl.constexpr,
):  # fmt: skip
    COLS: tl.constexpr = BLOCK_N // 2 if GATE_UP else BLOCK_N
    expert, col0, mask_m, a_row, y_row, slot = _task_rows(
        tasks_ptr, ids_ptr, num_tasks, N, tile_id, TOP_K, BLOCK_M, COLS, GROUP_M, GATE_UP)  # fmt: skip
    wrow, mask_n = _weight_rows(N, col0, BLOCK_N, GATE_UP)
    GROUPS: tl.constexpr = BLOCK_K // 32  # scale groups per K tile
    QBYTES: tl.constexpr = 16 if QUANT_BITS == 4 else 32  # qs bytes of a 32-group per weight row
    jq = tl.arange(0, QBYTES)  # 4 bits: half a group's elements (x columns) / its bytes; 8 bits: all
    e64 = expert.to(tl.int64)
    n64 = col0.to(tl.int64)
    a_ptrs = a_ptr + (a_row[:, None] * stride_am + jq[None, :] * stride_ak)
    q_ptrs = q_ptr + e64 * stride_qe + n64 * stride_qn + (jq[:, None] + wrow[None, :] * stride_qn)
    d_ptrs = d_ptr + e64 * stride_de + n64 * stride_dn + wrow * stride_dn
    m_ptrs = m_ptr + e64 * stride_me + n64 * stride_mn + wrow * stride_mn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        for g in tl.static_range(GROUPS):
            if EVEN_K:
                mask_a = mask_m[:, None]
                mask_w = mask_n[None, :]
                mask_s = mask_n
            else:  # K is whole 32-groups: a group is all inside K or all outside (vector compares)
                kg = k0 + g * 32
                mask_a = mask_m[:, None] & (kg + jq[None, :] < K)
                mask_w = (kg + jq[:, None] < K) & mask_n[None, :]
                mask_s = mask_n & (kg + 0 * wrow < K)
            a_lo = tl.load(a_ptrs + g * 32 * stride_ak, mask=mask_a, other=0.0)
            if QUANT_BITS == 4:
                a_hi = tl.load(a_ptrs + (g * 32 + 16) * stride_ak, mask=mask_a, other=0.0)
            else:
                a_hi = a_lo
            acc = _quant_group_dot(acc, a_lo, a_hi, q_ptrs + g * QBYTES, d_ptrs + g, m_ptrs + g, mask_w, mask_s,
                                   QUANT_BITS, FP32_IEEE)  # fmt: skip
        a_ptrs += BLOCK_K * stride_ak
        q_ptrs += GROUPS * QBYTES
        d_ptrs += GROUPS
        m_ptrs += GROUPS
    _store_rows(acc, y_ptr, rw_ptr, slot, y_row, mask_m, col0, N, stride_ym, stride_yn, BLOCK_M, BLOCK_N, GATE_UP)


@triton.jit
def moe_quant_gemm_kernel(
    a_ptr, q_ptr, d_ptr, m_ptr, y_ptr, ids_ptr, tasks_ptr, rw_ptr, num_tasks, N, K,
    stride_am, stride_ak, stride_qe, stride_qn, stride_de, stride_dn, stride_me, stride_mn,
    stride_ym, stride_yn, num_programs,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, QUANT_BITS: tl.constexpr, GATE_UP: tl.constexpr, EVEN_K: tl.constexpr,
    FP32_IEEE: tl.constexpr, PERSISTENT: tl.constexpr,
):  # fmt: skip
    """:func:`moe_gemm_kernel` on stacked quantized experts ``w[e] = dequant(q[e], d[e], m[e])``."""
    tl.static_assert(BLOCK_K % 32 == 0, "a K tile must cover whole 32-element scale groups")
    tl.static_assert(QUANT_BITS == 4 or QUANT_BITS == 8, "4- or 8-bit quants")
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs tile dims >= 16")
    tl.static_assert(BLOCK_N >= (32 if GATE_UP else 16), "tl.dot needs tile dims >= 16 (gate-up: BLOCK_N / 2)")
    pid = tl.program_id(0)
    if PERSISTENT:
        num_tiles = num_tasks * tl.cdiv(N, BLOCK_N // 2 if GATE_UP else BLOCK_N)
        for tile_id in tl.range(pid, num_tiles, num_programs):
            _moe_quant_tile(a_ptr, q_ptr, d_ptr, m_ptr, y_ptr, ids_ptr, tasks_ptr, rw_ptr, num_tasks, N, K,
                            stride_am, stride_ak, stride_qe, stride_qn, stride_de, stride_dn, stride_me, stride_mn,
                            stride_ym, stride_yn, tile_id, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, QUANT_BITS,
                            GATE_UP, EVEN_K, FP32_IEEE)  # fmt: skip
    else:
        _moe_quant_tile(a_ptr, q_ptr, d_ptr, m_ptr, y_ptr, ids_ptr, tasks_ptr, rw_ptr, num_tasks, N, K,
                        stride_am, stride_ak, stride_qe, stride_qn, stride_de, stride_dn, stride_me, stride_mn,
                        stride_ym, stride_yn, pid, TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, QUANT_BITS,
                        GATE_UP, EVEN_K, FP32_IEEE)  # fmt: skip


@triton.jit
def moe_combine_kernel(
    y_ptr, ids_ptr, out_ptr, T, H, expert_lo, expert_hi, stride_ym, stride_it, stride_ot, num_programs,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """``out[t, c] = sum_j y[t * TOP_K + j, c]`` over the slots ``j`` whose expert id is in
    ``[expert_lo, expert_hi)`` (other slots are not read), summed in fp32 in slot order and cast
    to out's dtype. Tasks are (BLOCK_T tokens, BLOCK_H columns); program ``pid`` does tasks
    ``pid, pid + num_programs, ...``."""
    pid = tl.program_id(0)
    n_cb = tl.cdiv(H, BLOCK_H)
    cols = tl.arange(0, BLOCK_H)
    rt0 = tl.arange(0, BLOCK_T)
    for task in tl.range(pid, tl.cdiv(T, BLOCK_T) * n_cb, num_programs):
        t = ((task // n_cb) * BLOCK_T + rt0).to(tl.int64)
        c0 = (task % n_cb) * BLOCK_H
        mask_t = t < T
        mask_h = cols < H - c0
        acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            e = tl.load(ids_ptr + t * stride_it + j, mask=mask_t, other=-1)
            local = mask_t & (e >= expert_lo) & (e < expert_hi)
            v = tl.load(y_ptr + (t * TOP_K + j)[:, None] * stride_ym + (c0 + cols)[None, :],
                        mask=local[:, None] & mask_h[None, :], other=0.0)  # fmt: skip
            acc += v.to(tl.float32)
        o = out_ptr + t[:, None] * stride_ot + (c0 + cols)[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_h[None, :])


@triton.jit
def moe_route_kernel(
    logits_ptr, w_ptr, ids_ptr, T, E, stride_lt, stride_le, num_programs,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):  # fmt: skip
    """Top-``TOP_K`` softmax routing of BLOCK_T tokens per task (see the module doc): fp32
    weights ``w [T, TOP_K]`` and int64 ids ``ids [T, TOP_K]``, both contiguous."""
    tl.static_assert(TOP_K <= BLOCK_K and BLOCK_K <= BLOCK_E, "k <= BLOCK_K <= BLOCK_E")
    pid = tl.program_id(0)
    re = tl.arange(0, BLOCK_E)
    rk = tl.arange(0, BLOCK_K)
    rt0 = tl.arange(0, BLOCK_T)
    mask_e = re < E
    for blk in tl.range(pid, tl.cdiv(T, BLOCK_T), num_programs):
        rt = blk * BLOCK_T + rt0
        mask_t = rt < T
        ptrs = logits_ptr + rt.to(tl.int64)[:, None] * stride_lt + re[None, :] * stride_le
        logit = tl.load(ptrs, mask=mask_t[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
        logit = tl.where(mask_e[None, :], logit, float("-inf"))
        p = tl.exp(logit - tl.max(logit, 1)[:, None])
        p = p / tl.sum(p, 1)[:, None]
        sel = tl.where(mask_e[None, :], p, -1.0)  # probabilities are >= 0: -1 is never chosen
        wv = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        iv = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(sel, 1)
            idx = tl.min(tl.where(sel == best[:, None], re[None, :], BLOCK_E), 1)  # ties: lowest id
            wv = tl.where(rk[None, :] == j, best[:, None], wv)
            iv = tl.where(rk[None, :] == j, idx[:, None], iv)
            sel = tl.where(re[None, :] == idx[:, None], -1.0, sel)
        if RENORMALIZE:
            wv = wv / tl.sum(wv, 1)[:, None]  # columns past TOP_K hold 0
        out = rt.to(tl.int64)[:, None] * TOP_K + rk[None, :]
        mask = mask_t[:, None] & (rk[None, :] < TOP_K)
        tl.store(w_ptr + out, wv, mask=mask)
        tl.store(ids_ptr + out, iv.to(tl.int64), mask=mask)


# ------------------------------------------------------------------------------------------------
# host entry points
# ------------------------------------------------------------------------------------------------


def route_blocks(num_experts: int, top_k: int, num_tokens: int | None = None) -> dict[str, int]:
    """The routing kernel's tile: all experts (BLOCK_E, a power of two >= 16) x BLOCK_T tokens
    (BLOCK_T x BLOCK_E <= :data:`TILE_ELEMS`, BLOCK_T <= 64 and, given ``num_tokens``, no larger
    than the tokens need); BLOCK_K >= k."""
    block_e = max(16, triton.next_power_of_2(num_experts))
    block_t = max(1, min(64, TILE_ELEMS // block_e))
    if num_tokens is not None:
        block_t = min(block_t, triton.next_power_of_2(num_tokens))
    return {"BLOCK_T": block_t, "BLOCK_E": block_e, "BLOCK_K": triton.next_power_of_2(top_k)}


def combine_blocks(hidden: int, profile=None, num_tokens: int | None = None) -> dict[str, int]:
    """The combine kernel's tile: BLOCK_H columns (at most ``support.block_i``) x BLOCK_T tokens
    (BLOCK_T x BLOCK_H <= :data:`TILE_ELEMS`, BLOCK_T <= 64 and no larger than ``num_tokens`` needs)."""
    s = (profile.data.get("support") or {}) if profile is not None else {}
    block_h = min(triton.next_power_of_2(hidden), int(s.get("block_i", 1024)))
    block_t = max(1, min(64, TILE_ELEMS // block_h))
    if num_tokens is not None:
        block_t = min(block_t, triton.next_power_of_2(num_tokens))
    return {"BLOCK_T": block_t, "BLOCK_H": block_h}


def moe_route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, profile=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_logits [T, E]`` -> (fp32 weights ``[T, top_k]``, int64 ids ``[T, top_k]``), as
    ``moe_route_ref`` (ties: lowest expert id first)."""
    T, E = router_logits.shape
    if not 0 < top_k <= E:
        raise ValueError(f"moe_route: top_k={top_k} must be in 1..{E}")
    w = torch.empty((T, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=router_logits.device)
    if T == 0:
        return w, ids
    blocks = route_blocks(E, top_k, T)
    n_blocks = triton.cdiv(T, blocks["BLOCK_T"])
    progs = support_programs(n_blocks, profile) if profile is not None else n_blocks
    moe_route_kernel[(progs,)](
        router_logits, w, ids, T, E, router_logits.stride(0), router_logits.stride(1), progs,
        TOP_K=top_k, RENORMALIZE=bool(renormalize), **blocks,
        **(launch_options(profile) if profile is not None else {}),
    )  # fmt: skip
    return w, ids


def expert_shape(w: torch.Tensor | QuantWeight) -> tuple[int, int, int]:
    """``(E, N, K)`` of stacked expert weights (a tensor ``[E, N, K]`` or a stacked QuantWeight)."""
    if isinstance(w, QuantWeight):
        return w.qs.shape[0], w.n, w.k
    if w.dim() != 3:
        raise ValueError(f"fused_moe: stacked expert weights must be [E, N, K], got {tuple(w.shape)}")
    return tuple(w.shape)


def _slot_weights(topk_weights: torch.Tensor) -> torch.Tensor:
    """The routing weight of every slot ``t * k + j``, fp32 contiguous ``[T * k]``."""
    return topk_weights.reshape(-1).float().contiguous()


def _check_quant(w: QuantWeight, E: int, name: str) -> None:
    if w.qtype not in ("q4_0", "q4_1", "q8_0") or w.k % QBLOCK:
        raise ValueError(f"fused_moe: {name} must be q4_0 / q4_1 / q8_0 with K % {QBLOCK} == 0")
    per_row = w.k * w.bits // 8
    want = {"qs": ((E, w.n, per_row), torch.uint8), "d": ((E, w.n, w.k // QBLOCK), torch.float16),
            "m": ((E, w.n, w.k // QBLOCK), torch.float16)}  # fmt: skip
    for f, (shape, dtype) in want.items():
        t = getattr(w, f)
        if tuple(t.shape) != shape or t.dtype != dtype or t.stride(-1) != 1:
            raise ValueError(f"fused_moe: {name}.{f} must be {dtype} {shape} with a unit inner stride, "
                             f"got {t.dtype} {tuple(t.shape)}")  # fmt: skip


def _grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor | QuantWeight,
    y: torch.Tensor,
    gp: MoEGemmPlan,
    plan: MoEPlan,
    tasks: torch.Tensor,
    rw: torch.Tensor,
    gate_up: bool,
    fp32_ieee: bool,
) -> None:
    """Launch every tile group of one grouped GEMM (``a`` rows -> ``y`` rows, see the module doc).
    The gate-up GEMM's kernel N is its output width I (``gp.N = 2I`` weight rows)."""
    ids = plan.sorted_ids
    n = gp.N // 2 if gate_up else gp.N
    for ln in gp.launches:
        t: GemmTile = ln.tile
        tk = tasks[ln.task_start :]
        common = dict(TOP_K=plan.top_k, BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K, GROUP_M=gp.group_m,
                      GATE_UP=gate_up, EVEN_K=gp.K % t.BLOCK_K == 0, FP32_IEEE=fp32_ieee,
                      PERSISTENT=gp.persistent, **launch_kwargs(t.launch_options))  # fmt: skip
        if isinstance(w, QuantWeight):
            moe_quant_gemm_kernel[(ln.programs,)](
                a, w.qs, w.d, w.m, y, ids, tk, rw, ln.num_tasks, n, gp.K,
                a.stride(0), a.stride(1), w.qs.stride(0), w.qs.stride(1), w.d.stride(0), w.d.stride(1),
                w.m.stride(0), w.m.stride(1), y.stride(0), y.stride(1), ln.programs,
                QUANT_BITS=w.bits, **common,
            )  # fmt: skip
        else:
            moe_gemm_kernel[(ln.programs,)](
                a, w, y, ids, tk, rw, ln.num_tasks, n, gp.K,
                a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
                ln.programs, **common,
            )  # fmt: skip


def moe_combine(
    y: torch.Tensor, topk_ids: torch.Tensor, expert_start: int, num_experts: int, out: torch.Tensor, profile=None
) -> torch.Tensor:
    """``out [T, H] = sum_j y[t * k + j]`` over the local slots (:func:`moe_combine_kernel`);
    ``y [T * k, H]``, ``topk_ids [T, k]`` and ``out`` with unit column strides."""
    T, k = topk_ids.shape
    H = out.shape[1]
    if y.stride(1) != 1 or out.stride(1) != 1 or topk_ids.stride(1) != 1:
        raise ValueError("moe_combine: y, out and topk_ids need unit column strides")
    if T == 0:
        return out
    blocks = combine_blocks(H, profile, T)
    tasks = triton.cdiv(T, blocks["BLOCK_T"]) * triton.cdiv(H, blocks["BLOCK_H"])
    progs = support_programs(tasks, profile) if profile is not None else tasks
    moe_combine_kernel[(progs,)](
        y, topk_ids, out, T, H, expert_start, expert_start + num_experts, y.stride(0), topk_ids.stride(0),
        out.stride(0), progs, TOP_K=k, **blocks, **(launch_options(profile) if profile is not None else {}),
    )  # fmt: skip
    return out


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor | QuantWeight,
    w2: torch.Tensor | QuantWeight,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    profile,
    expert_start: int = 0,
    plan: MoEPlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed experts of ``x [T, H]`` (see the module doc) -> ``[T, H]`` in x.dtype. ``plan``:
    from :func:`plan_for` for the same ids (made here when None); ``out``: optional destination."""
    T, H = x.shape
    E, n1, k1 = expert_shape(w13)
    E2, n2, k2 = expert_shape(w2)
    if E2 != E or k1 != H or n2 != H or n1 != 2 * k2:
        raise ValueError(f"fused_moe: w13 {(E, n1, k1)} / w2 {(E2, n2, k2)} do not fit x [T, {H}] "
                         "(want [E, 2I, H] and [E, H, I])")  # fmt: skip
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != T:
        raise ValueError(f"fused_moe: topk ids {tuple(topk_ids.shape)} / weights {tuple(topk_weights.shape)} vs T={T}")
    quant = isinstance(w13, QuantWeight)
    if quant != isinstance(w2, QuantWeight):
        raise TypeError("fused_moe: w13 and w2 must both be quantized or both plain")
    if quant:
        _check_quant(w13, E, "w13")
        _check_quant(w2, E, "w2")
    elif w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise TypeError(f"fused_moe: dtypes differ (x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype})")
    if out is None:
        out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    elif out.shape != (T, H) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be [{T}, {H}] {x.dtype} with unit column stride, got {tuple(out.shape)}")
    if T == 0:
        return out
    if plan is None:
        plan = plan_for(topk_ids, w13, w2, profile, expert_start, x.element_size())
    elif (plan.num_tokens, plan.top_k, plan.num_experts, plan.expert_start) != (T, topk_ids.shape[1], E, expert_start):
        raise ValueError(f"fused_moe: the plan is for T={plan.num_tokens} k={plan.top_k} E={plan.num_experts} "
                         f"expert_start={plan.expert_start}")  # fmt: skip
    A = plan.num_assignments
    if A == 0:
        return out.zero_()
    fp32_ieee = x.dtype == torch.float32 and profile.gemm.get("fp32_precision", "ieee") == "ieee"
    rw = _slot_weights(topk_weights)
    n_up = len(plan.gate_up.tasks)
    act = torch.empty((A, k2), dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, act, plan.gate_up, plan, plan.task_table, rw, True, fp32_ieee)
    y = torch.empty((T * topk_ids.shape[1], H), dtype=x.dtype, device=x.device)
    _grouped_gemm(act, w2, y, plan.down, plan, plan.task_table[n_up:], rw, False, fp32_ieee)
    return moe_combine(y, topk_ids.contiguous(), expert_start, E, out, profile)


def plan_for(
    topk_ids: torch.Tensor,
    w13: torch.Tensor | QuantWeight,
    w2: torch.Tensor | QuantWeight,
    profile,
    expert_start: int = 0,
    elem_bytes: int = 2,
    tile: GemmTile | dict | None = None,
) -> MoEPlan:
    """:func:`.moe_plan.plan_moe` for these weights: the ``gemm`` menu for plain experts, the
    ``quant_gemm`` menu for quantized ones; ``tile``: every expert on that one tile."""
    E, n1, k1 = expert_shape(w13)
    _, n2, k2 = expert_shape(w2)
    prof = tiled_profile(profile) if isinstance(w13, QuantWeight) else profile
    if isinstance(tile, dict):
        tile = GemmTile.from_dict(tile)
    return plan_moe(topk_ids, E, expert_start, (n1, k1), (n2, k2), prof, elem_bytes, tile)
