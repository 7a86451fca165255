"""Meta-Attention: one Triton launch computes attention for any mix of prefill, prefill-with-history
(prefix hit or later chunk), decode and verify (chain or tree) stages over the paged KV cache.

Torch reference: ``portable_xy.backends.reference.attention_ref``.

Layouts
  q, out          ``[T, Hq, D]`` (any token/head strides, unit last stride)
  k_cache/v_cache ``[num_blocks, KV_BLOCK, Hkv, D]``; KV column ``j`` of stage ``s`` lives in block
                  ``block_tables[s, j // KV_BLOCK]`` at offset ``j % KV_BLOCK``
  block_tables    int32 ``[S, max_blocks]``
  units           int32 ``[U, 8]`` = (stage, tok_start, n_tok, kv_head, kv_lo, kv_hi, split, tile_m),
                  dealt to cores by :mod:`.task_table` (``kv_hi = -1``: the KV piece is cut from
                  the run-time ``seq_lens``, for fixed decode plans that CUDA / NPU graphs replay)
  segments        int32 ``[num_cores * 4 + 1]``: core ``p`` runs ``units[segments[4p + k] :
                  segments[4p + k + 1]]`` in query tile ``M_TILE<k>``
  tree masks      int8, stage ``s``'s ``q_len x q_len`` mask at ``tree_mask_offsets[s]`` (-1: causal)

Every unit is one GEMM-softmax-GEMM tile: ``BLOCK_M`` rows = query tokens x ``GROUP`` query heads of
one KV head (row = token * GROUP + head, so GQA heads share every K/V load), online softmax in fp32
over ``BLOCK_N``-column KV tiles read straight from the cache through the block table (no gather,
no padded copy). Visibility of column ``j`` to the stage's new token ``i`` (``hist = seq_len -
q_len``): ``j < hist`` always; for ``j >= hist`` causal ``j <= hist + i`` (derived from positions,
no mask tensor), or the stage's tree mask. Each unit runs two loops: the KV tiles every row of the
unit sees in full (no mask work at all), then the few edge tiles (causal diagonal, tree block, KV
tail) with masks. Columns past the unit's last visible one are never read (causal tile skipping).

Per-stage tile sizes in one launch: the launch is compiled for up to four query-tile sizes of the
profile menu (``M_TILE0 <= .. <= M_TILE3``, a size repeating the previous one is compiled out), and
each program runs one loop per size over its units of that size, so a decode in a batch with a
long prefill still runs a 16-row tile. (One loop per size rather than a branch per unit: loop
invariants of the four tile shapes are then never live at the same time, which keeps the 4-size
kernel within the register budget of the largest tile alone.)

Constexprs: ``GROUP`` (query heads per KV head), ``HEAD_DIM`` (a power of two >= 16),
``M_TILE0..3`` (query tiles, from ``attention.q_tiles``), ``BLOCK_N`` (``attention.kv_tile``),
``KV_BLOCK`` (the cache block size), ``HAS_TREE`` (the step has a tree-verify stage), ``SPLIT``
(write split-KV partials for :func:`split_kv_reduce_kernel` instead of the output),
``FP32_IEEE`` (fp32 inputs: exact fp32 dots instead of tf32).

The grid is persistent: ``num_cores`` programs (SMs on CUDA, AI cores on Ascend), each walking its
unit list. Only Triton 3.2 language features are used (no descriptors, no tl.range options, no
pointer-to-pointer loads) so that triton-ascend 3.2 compiles and interprets the same source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import launch_kwargs
from .task_table import (
    MAX_LAUNCH_TILES,
    UNIT_FIELDS,
    TaskTable,
    build_decode_task_table,
    build_task_table,
    choose_num_splits,
)

UNIT_WIDTH = tl.constexpr(len(UNIT_FIELDS))
SEG_WIDTH = tl.constexpr(MAX_LAUNCH_TILES)  # segments per core (M_TILE0..M_TILE3)


@triton.jit
def _kv_step(
    q, acc, m_i, l_i, k_base, v_base, bt_row, tree_ptr,
    j0, end, hist, tpos, row_ok, tree_row,
    stride_kb, stride_ks, stride_vb, stride_vs, scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    MASKED: tl.constexpr, HAS_TREE: tl.constexpr, FP32_IEEE: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over KV columns ``j0 .. j0 + BLOCK_N``. ``MASKED=False``: every row
    sees every column (no bounds or visibility masks); ``MASKED=True``: columns ``>= end`` and
    invisible (row, column) pairs are masked out. Returns the updated ``(acc, m_i, l_i)``."""
    cols = j0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    if MASKED:
        col_ok = cols < end
        blk = tl.load(bt_row + cols // KV_BLOCK, mask=col_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + cols // KV_BLOCK).to(tl.int64)
    off = cols % KV_BLOCK
    k_ptrs = k_base + (blk * stride_kb + off * stride_ks)[None, :] + d[:, None]  # [HEAD_DIM, BLOCK_N]
    if MASKED:
        kt = tl.load(k_ptrs, mask=col_ok[None, :], other=0.0)
    else:
        kt = tl.load(k_ptrs)
    if FP32_IEEE:
        s = tl.dot(q, kt, input_precision="ieee") * scale
    else:
        s = tl.dot(q, kt) * scale
    if MASKED:
        new = cols[None, :] - hist  # the column among the stage's new tokens (< 0: history)
        ok = col_ok[None, :]  # (padded rows compute values that are never stored)
        if HAS_TREE:
            is_tree = tree_row[:, None] >= 0
            tm = tl.load(tree_ptr + tree_row[:, None] + new, mask=ok & is_tree & (new >= 0), other=0)
            ok = ok & ((new < 0) | tl.where(is_tree, tm != 0, new <= tpos[:, None]))
        else:
            ok = ok & (new <= tpos[:, None])
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:  # a row with nothing visible yet keeps a finite max far below any score: p = 0
        m_new = tl.maximum(m_new, -1e30)
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = v_base + (blk * stride_vb + off * stride_vs)[:, None] + d[None, :]  # [BLOCK_N, HEAD_DIM]
    if MASKED:
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if FP32_IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _attend_unit(
    u, q_ptr, k_ptr, v_ptr, o_ptr,
    units_ptr, q_start_ptr, seq_lens_ptr, tables_ptr, tree_off_ptr, tree_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    num_q_heads, num_splits, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_BLOCK: tl.constexpr, HAS_TREE: tl.constexpr, SPLIT: tl.constexpr, FP32_IEEE: tl.constexpr,
):  # fmt: skip
    """Unit ``u`` of the task table in a ``BLOCK_M``-row query tile."""
    unit = units_ptr + u * UNIT_WIDTH
    s = tl.load(unit)
    t0 = tl.load(unit + 1)
    n_tok = tl.load(unit + 2)
    kvh = tl.load(unit + 3)
    kv_lo = tl.load(unit + 4)
    kv_hi = tl.load(unit + 5)
    q0 = tl.load(q_start_ptr + s)
    q_len = tl.load(q_start_ptr + s + 1) - q0
    seq_len = tl.load(seq_lens_ptr + s)
    hist = seq_len - q_len
    # kv_hi < 0 (a fixed decode plan): piece `split` of the run-time length, cut as task_table.split_range
    piece = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    run_lo = tl.minimum(tl.load(unit + 6) * piece, seq_len)
    at_run_time = kv_hi < 0
    kv_lo = tl.where(at_run_time, run_lo, kv_lo)
    kv_hi = tl.where(at_run_time, tl.minimum(run_lo + piece, seq_len), kv_hi)

    rows = t0 * GROUP + tl.arange(0, BLOCK_M)  # the tile's rows among the stage's token x head rows
    d = tl.arange(0, HEAD_DIM)
    tpos = rows // GROUP  # the row's token among the stage's new tokens
    row_ok = tpos < t0 + n_tok
    qh = kvh * GROUP + rows % GROUP  # the row's query head
    tok = (q0 + tpos).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + qh[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip

    # [kv_lo, mid): tiles every row sees in full; [mid, end): edge tiles with masks; nothing past end
    end = tl.minimum(kv_hi, hist + t0 + n_tok)  # causal: the unit's last token's column + 1
    full = hist + t0 + 1  # causal: columns its first token sees
    if HAS_TREE:
        tree_off = tl.load(tree_off_ptr + s)
        end = tl.where(tree_off >= 0, kv_hi, end)
        full = tl.where(tree_off >= 0, hist, full)
        # each row's offset into the tree masks, -1 in a causal stage and in padded rows (a
        # row-vector condition: the interpreters mishandle scalar-bool & tensor masks)
        tree_row = tl.where((tree_off >= 0) & row_ok, tree_off + tpos * q_len, -1)
    else:
        tree_row = tpos  # unused
    full = tl.minimum(full, end)
    mid = kv_lo + tl.maximum(full - kv_lo, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    bt_row = tables_ptr + s * stride_bt
    for j0 in range(kv_lo, mid, BLOCK_N):
        acc, m_i, l_i = _kv_step(
            q, acc, m_i, l_i, k_base, v_base, bt_row, tree_ptr, j0, end, hist, tpos, row_ok, tree_row,
            stride_kb, stride_ks, stride_vb, stride_vs, scale,
            HEAD_DIM, BLOCK_N, KV_BLOCK, False, HAS_TREE, FP32_IEEE,
        )  # fmt: skip
    for j0 in range(mid, end, BLOCK_N):
        acc, m_i, l_i = _kv_step(
            q, acc, m_i, l_i, k_base, v_base, bt_row, tree_ptr, j0, end, hist, tpos, row_ok, tree_row,
            stride_kb, stride_ks, stride_vb, stride_vs, scale,
            HEAD_DIM, BLOCK_N, KV_BLOCK, True, HAS_TREE, FP32_IEEE,
        )  # fmt: skip

    if SPLIT:  # partial (max, sum, acc) of this KV piece, combined by split_kv_reduce_kernel
        part = (tok * num_q_heads + qh) * num_splits + tl.load(unit + 6)
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
    else:
        out = acc / tl.where(row_ok, l_i, 1.0)[:, None]  # padded rows: no 0/0
        tl.store(o_ptr + tok[:, None] * stride_ot + qh[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


@triton.jit
def meta_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    units_ptr, segments_ptr, q_start_ptr, seq_lens_ptr, tables_ptr, tree_off_ptr, tree_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    num_q_heads, num_splits, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    M_TILE0: tl.constexpr, M_TILE1: tl.constexpr, M_TILE2: tl.constexpr, M_TILE3: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr, HAS_TREE: tl.constexpr, SPLIT: tl.constexpr,
    FP32_IEEE: tl.constexpr,
):  # fmt: skip
    """Persistent Meta-Attention: program ``p`` runs its units of each launch tile ``M_TILE<k>``
    (``units[segments[4p + k] : segments[4p + k + 1]]``), one loop per tile size (tile sizes
    that repeat the previous one are compiled out)."""
    seg = segments_ptr + tl.program_id(0) * SEG_WIDTH
    for u in range(tl.load(seg), tl.load(seg + 1)):
        _attend_unit(
            u, q_ptr, k_ptr, v_ptr, o_ptr, units_ptr, q_start_ptr, seq_lens_ptr, tables_ptr, tree_off_ptr,
            tree_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
            num_q_heads, num_splits, scale,
            GROUP, HEAD_DIM, M_TILE0, BLOCK_N, KV_BLOCK, HAS_TREE, SPLIT, FP32_IEEE,
        )  # fmt: skip
    if M_TILE1 > M_TILE0:  # compile time
        for u in range(tl.load(seg + 1), tl.load(seg + 2)):
            _attend_unit(
                u, q_ptr, k_ptr, v_ptr, o_ptr, units_ptr, q_start_ptr, seq_lens_ptr, tables_ptr, tree_off_ptr,
                tree_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                num_q_heads, num_splits, scale,
                GROUP, HEAD_DIM, M_TILE1, BLOCK_N, KV_BLOCK, HAS_TREE, SPLIT, FP32_IEEE,
            )  # fmt: skip
    if M_TILE2 > M_TILE1:
        for u in range(tl.load(seg + 2), tl.load(seg + 3)):
            _attend_unit(
                u, q_ptr, k_ptr, v_ptr, o_ptr, units_ptr, q_start_ptr, seq_lens_ptr, tables_ptr, tree_off_ptr,
                tree_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                num_q_heads, num_splits, scale,
                GROUP, HEAD_DIM, M_TILE2, BLOCK_N, KV_BLOCK, HAS_TREE, SPLIT, FP32_IEEE,
            )  # fmt: skip
    if M_TILE3 > M_TILE2:
        for u in range(tl.load(seg + 3), tl.load(seg + 4)):
            _attend_unit(
                u, q_ptr, k_ptr, v_ptr, o_ptr, units_ptr, q_start_ptr, seq_lens_ptr, tables_ptr, tree_off_ptr,
                tree_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, stride_qt, stride_qh, stride_ot, stride_oh,
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                num_q_heads, num_splits, scale,
                GROUP, HEAD_DIM, M_TILE3, BLOCK_N, KV_BLOCK, HAS_TREE, SPLIT, FP32_IEEE,
            )  # fmt: skip


@triton.jit
def split_kv_reduce_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, o_ptr,
    n_rows, num_q_heads, num_splits, stride_ot, stride_oh, num_programs,
    SPLITS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Combine the split-KV partials of row ``r = token * Hq + head`` (partials at
    ``r * num_splits + split``): weights ``w_i = exp(m_i - max m)``,
    ``out = sum(w_i acc_i) / sum(w_i l_i)``. Persistent: program ``p`` does rows ``p, p + P, ..``."""
    pid = tl.program_id(0)
    sp = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, HEAD_DIM)
    sp_ok = sp < num_splits
    for r in range(pid, n_rows, num_programs):
        base = r * num_splits
        m = tl.load(part_m_ptr + base + sp, mask=sp_ok, other=float("-inf"))
        ell = tl.load(part_l_ptr + base + sp, mask=sp_ok, other=0.0)
        acc = tl.load(part_acc_ptr + (base + sp)[:, None] * HEAD_DIM + d[None, :], mask=sp_ok[:, None], other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
        out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * ell, 0)
        tok = r // num_q_heads
        head = r % num_q_heads
        tl.store(o_ptr + tok.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty))


# -------------------------------------------------------------------------------------------------
# host side
# -------------------------------------------------------------------------------------------------
@dataclass
class AttentionPlan:
    """Host work done once per step and reused by every layer: the task table (on the device)
    and the launch configuration."""

    table: TaskTable
    group: int
    num_q_heads: int
    num_kv_heads: int
    launch_tiles: tuple[int, int, int, int]  # M_TILE0..3
    block_n: int
    has_tree: bool
    attention: dict  # the profile's ``attention`` section (warps, stages, compile options)


def _num_warps(att: dict, block_m: int, head_dim: int) -> int:
    """``attention.num_warps[block_m]`` from the profile, else 4 warps below 4096 fp32
    accumulator elements per tile (BLOCK_M x HEAD_DIM) and 8 from there."""
    warps = att.get("num_warps") or {}
    default = 4 if block_m * head_dim < 4096 else 8
    return int(warps.get(block_m, warps.get(str(block_m), default)))


def tree_max_q_tile(att: dict, head_dim: int | None = None) -> int:
    """The largest query tile of a step with a tree stage: ``attention.tree_max_q_tile``, an int
    or ``{head_dim: tile}`` (a head dim it does not name gets 64)."""
    cap = att.get("tree_max_q_tile") or 64
    if isinstance(cap, dict):
        cap = cap.get(head_dim, cap.get(str(head_dim), 64)) if head_dim is not None else min(cap.values(), default=64)
    return int(cap)


def attention_launch_options(att: dict, block_m: int, head_dim: int) -> dict:
    """Compile options of a launch whose largest query tile is ``block_m``."""
    opts = {"num_warps": _num_warps(att, block_m, head_dim), "num_stages": int(att.get("num_stages", 2))}
    return {**opts, **(att.get("options") or {})}


def _group_and_menu(att: dict, num_heads: int, num_kv_heads: int) -> tuple[int, list[int]]:
    """GQA group and the checked query-tile menu (ascending)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    menu = sorted(int(t) for t in att["q_tiles"])
    if any(t < 16 or t & (t - 1) for t in menu):
        raise ValueError(f"attention.q_tiles {menu}: tiles must be powers of two >= 16 (tl.dot)")
    return num_heads // num_kv_heads, menu


def plan_attention(meta, num_heads: int, num_kv_heads: int, profile, head_dim: int | None = None) -> AttentionPlan:
    """Token table (``meta``) -> task table for ``profile``'s tile menu and core count.

    Profile keys (``attention.*``): ``q_tiles`` (query-tile menu, powers of two >= 16);
    ``kv_tile``; ``tree_max_q_tile`` (steps with a tree-verify stage use menu tiles up to this,
    per ``head_dim`` where it is a mapping, see :func:`tree_max_q_tile`; default 64: 128-row tree
    tiles spill registers on sm_80 and sm_90); ``split_kv: {max_seqs,
    num_splits}`` (decode-only steps of at most ``max_seqs`` sequences that leave cores idle split
    each sequence's KV into up to ``num_splits`` pieces, see
    :func:`~.task_table.choose_num_splits`); ``num_warps`` (``{tile: warps}``); ``num_stages``
    (default 2); ``options`` (extra compile options, e.g. triton-ascend's ``multibuffer``)."""
    att = profile.attention
    group, menu = _group_and_menu(att, num_heads, num_kv_heads)
    block_n = int(att["kv_tile"])
    has_tree = meta.tree_mask_offsets is not None
    if has_tree:  # the per-element tree-mask gather costs registers: smaller tiles
        menu = [t for t in menu if t <= tree_max_q_tile(att, head_dim)] or menu[:1]
    split_cfg = att.get("split_kv") or {}
    num_splits = 1
    if not has_tree:
        num_splits = choose_num_splits(
            meta.query_lens_cpu, meta.seq_lens_cpu, num_kv_heads, profile.num_cores,
            int(split_cfg.get("max_seqs", 0)), int(split_cfg.get("num_splits", 1)), block_n,
        )  # fmt: skip
    table = build_task_table(
        meta.query_lens_cpu, meta.seq_lens_cpu, num_kv_heads, group, menu, profile.num_cores,
        num_splits=num_splits, kv_tile=block_n, device=meta.query_start_loc.device,
    )  # fmt: skip
    return AttentionPlan(
        table=table, group=group, num_q_heads=num_heads, num_kv_heads=num_kv_heads, launch_tiles=table.launch_tiles,
        block_n=block_n, has_tree=has_tree, attention=dict(att),
    )  # fmt: skip


def plan_decode_attention(
    batch_size: int, max_seq_len: int, num_heads: int, num_kv_heads: int, profile, device: torch.device | str
) -> AttentionPlan:  # fmt: skip
    """The fixed plan of a decode-only step of ``batch_size`` stages (query length 1, KV length
    at most ``max_seq_len``), for a static-shape (graph-captured) decode: its task table has the
    same shape and contents whatever the step's lengths, and its split-KV factor is the one
    :func:`plan_attention` would choose for ``batch_size`` sequences of ``max_seq_len``. The
    kernel cuts each unit's KV piece from the run-time ``seq_lens``."""
    att = profile.attention
    group, menu = _group_and_menu(att, num_heads, num_kv_heads)
    block_n = int(att["kv_tile"])
    split_cfg = att.get("split_kv") or {}
    num_splits = choose_num_splits(
        [1] * batch_size, [max_seq_len] * batch_size, num_kv_heads, profile.num_cores,
        int(split_cfg.get("max_seqs", 0)), int(split_cfg.get("num_splits", 1)), block_n,
    )  # fmt: skip
    table = build_decode_task_table(
        batch_size, max_seq_len, num_kv_heads, group, menu, profile.num_cores,
        num_splits=num_splits, kv_tile=block_n, device=device,
    )  # fmt: skip
    return AttentionPlan(
        table=table, group=group, num_q_heads=num_heads, num_kv_heads=num_kv_heads, launch_tiles=table.launch_tiles,
        block_n=block_n, has_tree=False, attention=dict(att),
    )  # fmt: skip


def meta_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta,
    scale: float,
    plan: AttentionPlan,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q [T, Hq, D]`` over the paged caches ``[num_blocks, block_size, Hkv, D]``
    (which already hold this step's K/V) for the whole mixed batch described by ``meta``
    (:class:`~portable_xy.backends.base.AttnMetadata`), in one launch (plus one reduce launch on
    the split-KV path). ``plan`` comes from :func:`plan_attention` for the same ``meta``.
    Returns ``out [T, Hq, D]`` (``q``'s dtype; written in place when given). Reference:
    ``portable_xy.backends.reference.attention_ref``."""
    t, hq, d = q.shape
    if hq != plan.num_q_heads or k_cache.shape[2] != plan.num_kv_heads:
        raise ValueError(
            f"meta_attention: plan is for {plan.num_q_heads}/{plan.num_kv_heads} heads, got {hq}/{k_cache.shape[2]}"
        )
    if d < 16 or d & (d - 1):
        raise ValueError(f"meta_attention: head_dim {d} must be a power of two >= 16")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("meta_attention: q and the caches need a unit last stride")
    out = torch.empty_like(q) if out is None else out
    table = plan.table
    dummy = meta.seq_lens
    split = table.num_splits > 1
    if split:
        parts = t * hq * table.num_splits
        part_m = torch.empty(parts, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(parts, d, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = dummy
    kw = launch_kwargs(attention_launch_options(plan.attention, plan.launch_tiles[-1], d))
    m0, m1, m2, m3 = plan.launch_tiles
    meta_attention_kernel[(table.num_cores,)](
        q, k_cache, v_cache, out,
        table.units, table.segments, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        meta.tree_mask_offsets if plan.has_tree else dummy, meta.tree_masks if plan.has_tree else dummy,
        part_m, part_l, part_acc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        hq, table.num_splits, float(scale),
        GROUP=plan.group, HEAD_DIM=d, M_TILE0=m0, M_TILE1=m1, M_TILE2=m2, M_TILE3=m3,
        BLOCK_N=plan.block_n, KV_BLOCK=k_cache.shape[1], HAS_TREE=plan.has_tree, SPLIT=split,
        FP32_IEEE=q.dtype == torch.float32, **kw,
    )  # fmt: skip
    if split:
        rows = t * hq
        progs = min(rows, table.num_cores * 4)
        split_kv_reduce_kernel[(progs,)](
            part_m, part_l, part_acc, out, rows, hq, table.num_splits, out.stride(0), out.stride(1), progs,
            SPLITS_P2=triton.next_power_of_2(table.num_splits), HEAD_DIM=d, **launch_kwargs({"num_warps": 4}),
        )  # fmt: skip
    return out
