"""Meta-Attention: one Triton launch computes attention for any mix of prefill, prefill-with-history
(prefix hit or later chunk), decode and verify (chain or tree) stages over the paged KV cache.

Torch reference: ``portable_xy.backends.cpu.attention_ref``.

Layouts
  q, out          ``[T, Hq, D]`` (any token/head strides, unit last stride)
  k_cache/v_cache ``[num_blocks, KV_BLOCK, Hkv, D]``; token ``j`` of stage ``s`` lives in block
                  ``block_tables[s, j // KV_BLOCK]`` at offset ``j % KV_BLOCK``
  units           int32 ``[U, 7]`` = (stage, tok_start, n_tok, kv_head, kv_lo, kv_hi, split), dealt
                  to cores by :mod:`task_table`; core ``p`` owns ``core_offsets[p]:core_offsets[p+1]``

Every unit is one GEMM-softmax-GEMM tile: ``BLOCK_M`` rows = ``n_tok`` query tokens x ``GROUP``
query heads of one KV head (GQA heads share each K/V load), online softmax over ``BLOCK_N``-column
KV tiles read straight from the cache through the block table (no gather, no padded copy).
Visibility of column ``j`` to the stage's new token ``i`` (history ``hist = seq_len - q_len``):
``j < hist`` always; for ``j >= hist`` causal ``j <= hist + i`` (derived from positions, no mask
tensor), or the stage's ``q_len x q_len`` int8 tree mask. A causal unit stops at its last
token's column, so fully masked KV tiles are skipped.

Constexprs: ``GROUP`` (query heads per KV head), ``HEAD_DIM`` (power of two >= 16), ``BLOCK_M``
(the launch's query tile, from the profile menu), ``BLOCK_N`` (``attention.kv_tile``),
``KV_BLOCK`` (cache block size), ``HAS_TREE``, ``SPLIT`` (write split-KV partials for
:func:`split_kv_reduce_kernel` instead of the output), ``FP32_IEEE``.

The grid is persistent: ``num_cores`` programs (SMs on CUDA, AI cores on Ascend), each walking
its unit list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .smooth_gemm import launch_kwargs
from .task_table import TaskTable, build_task_table

N_FIELDS = 7


@triton.jit
def meta_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    units_ptr, core_offsets_ptr, q_start_ptr, seq_lens_ptr, tables_ptr, tree_off_ptr, tree_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    num_q_heads, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_BLOCK: tl.constexpr, HAS_TREE: tl.constexpr, SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr,
    FP32_IEEE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    u_lo = tl.load(core_offsets_ptr + pid)
    u_hi = tl.load(core_offsets_ptr + pid + 1)
    rows = tl.arange(0, BLOCK_M)
    tok_in_unit = rows // GROUP
    head_in_group = rows % GROUP
    d = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)
    for u in range(u_lo, u_hi):
        unit = units_ptr + u * 7
        s = tl.load(unit)
        t0 = tl.load(unit + 1)
        n_tok = tl.load(unit + 2)
        kvh = tl.load(unit + 3)
        kv_lo = tl.load(unit + 4)
        kv_hi = tl.load(unit + 5)
        q0 = tl.load(q_start_ptr + s)
        q_len = tl.load(q_start_ptr + s + 1) - q0
        hist = tl.load(seq_lens_ptr + s) - q_len
        row_ok = tok_in_unit < n_tok
        tpos = t0 + tok_in_unit  # index among the stage's new tokens
        tok = (q0 + tpos).to(tl.int64)
        qh = kvh * GROUP + head_in_group
        q = tl.load(q_ptr + tok[:, None] * stride_qt + qh[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)  # fmt: skip
        # a causal unit needs no column past its last token; a tree unit may look at all of them
        if HAS_TREE:
            tree_off = tl.load(tree_off_ptr + s)
            end = tl.where(tree_off < 0, tl.minimum(kv_hi, hist + t0 + n_tok), kv_hi)
        else:
            end = tl.minimum(kv_hi, hist + t0 + n_tok)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for j0 in range(kv_lo, end, BLOCK_N):
            j = j0 + cols
            col_ok = j < end
            blk = tl.load(tables_ptr + s * stride_bt + j // KV_BLOCK, mask=col_ok, other=0).to(tl.int64)
            off = j % KV_BLOCK
            kt = tl.load(
                k_ptr + (blk * stride_kb + off * stride_ks + kvh * stride_kh)[None, :] + d[:, None],
                mask=col_ok[None, :],
                other=0.0,
            )  # fmt: skip  [HEAD_DIM, BLOCK_N]
            if FP32_IEEE:
                scores = tl.dot(q, kt, input_precision="ieee") * scale
            else:
                scores = tl.dot(q, kt) * scale
            new = j[None, :] - hist  # column index among the new tokens (negative: history)
            visible = col_ok[None, :] & row_ok[:, None]
            if HAS_TREE:
                is_tree = tree_off >= 0
                in_tree = visible & (new >= 0) & is_tree
                # masked-off lanes read element 0 (always valid) instead of using a load mask
                tm = tl.load(tree_ptr + tl.where(in_tree, tree_off + tpos[:, None] * q_len + new, 0))
                tree_ok = (new < 0) | (in_tree & (tm != 0))
                causal_ok = new <= tpos[:, None]
                visible = visible & ((is_tree & tree_ok) | ((tree_off < 0) & causal_ok))
            else:
                visible = visible & (new <= tpos[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_ptr + (blk * stride_vb + off * stride_vs + kvh * stride_vh)[:, None] + d[None, :],
                mask=col_ok[:, None],
                other=0.0,
            )  # fmt: skip  [BLOCK_N, HEAD_DIM]
            if FP32_IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if SPLIT:
            part = (tok * num_q_heads + qh) * NUM_SPLITS + tl.load(unit + 6)
            tl.store(part_m_ptr + part, m_i, mask=row_ok)
            tl.store(part_l_ptr + part, l_i, mask=row_ok)
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        else:
            out = acc / tl.where(row_ok, l_i, 1.0)[:, None]  # padded rows: no 0/0
            tl.store(o_ptr + tok[:, None] * stride_ot + qh[:, None] * stride_oh + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])  # fmt: skip


@triton.jit
def split_kv_reduce_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, o_ptr,
    n_rows, num_q_heads, stride_ot, stride_oh, num_programs,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Combine the split-KV partials of row ``r = token * Hq + head``: weights
    ``exp(m_i - max m)``, ``out = sum(w_i acc_i) / sum(w_i l_i)``."""
    pid = tl.program_id(0)
    sp = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, HEAD_DIM)
    sp_ok = sp < NUM_SPLITS
    for r in range(pid, n_rows, num_programs):
        base = r * NUM_SPLITS
        m = tl.load(part_m_ptr + base + sp, mask=sp_ok, other=float("-inf"))
        ell = tl.load(part_l_ptr + base + sp, mask=sp_ok, other=0.0)
        acc = tl.load(part_acc_ptr + (base + sp)[:, None] * HEAD_DIM + d[None, :], mask=sp_ok[:, None], other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
        out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * ell, 0)
        tok = r // num_q_heads
        head = r % num_q_heads
        tl.store(o_ptr + tok.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty))


@dataclass
class AttentionPlan:
    """Host work done once per step and reused by every layer."""

    table: TaskTable
    group: int
    num_q_heads: int
    block_n: int
    num_warps: int
    options: dict


def _num_warps(profile, block_m: int) -> int:
    warps = (profile.attention.get("num_warps") or {}) if profile is not None else {}
    return int(warps.get(block_m, warps.get(str(block_m), 4 if block_m <= 64 else 8)))


def plan_attention(meta, num_heads: int, num_kv_heads: int, profile) -> AttentionPlan:
    """Token table (``meta``) -> task table for ``profile``'s tile menu and core count. Decode-only
    steps with at most ``attention.split_kv.max_seqs`` sequences also split the KV range into
    ``attention.split_kv.num_splits`` pieces so every core has work."""
    att = profile.attention
    group = num_heads // num_kv_heads
    split_cfg = att.get("split_kv") or {}
    num_splits = int(split_cfg.get("num_splits", 1))
    use_split = (
        num_splits > 1
        and meta.max_query_len == 1
        and meta.tree_mask_offsets is None
        and meta.num_stages <= int(split_cfg.get("max_seqs", 0))
    )
    block_n = int(att["kv_tile"])
    table = build_task_table(
        meta.query_lens_cpu, meta.seq_lens_cpu, num_kv_heads, group, list(att["q_tiles"]), profile.num_cores,
        num_splits=num_splits if use_split else 1, kv_tile=block_n, device=meta.query_start_loc.device,
    )  # fmt: skip
    return AttentionPlan(
        table=table, group=group, num_q_heads=num_heads, block_n=block_n,
        num_warps=_num_warps(profile, table.block_m), options=dict(att.get("options") or {}),
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
    """Attention of ``q [T, Hq, D]`` over the paged cache for the whole mixed batch in one launch
    (plus one reduce launch on the split-KV path). Same contract as ``Backend.attention``."""
    t, hq, d = q.shape
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("meta_attention: q and the caches need a unit last stride")
    out = torch.empty_like(q) if out is None else out
    table = plan.table
    has_tree = meta.tree_mask_offsets is not None
    dummy = meta.seq_lens
    split = table.num_splits > 1
    if split:
        parts = t * hq * table.num_splits
        part_m = torch.empty(parts, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(parts, d, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = dummy
    kw = launch_kwargs({"num_warps": plan.num_warps, "num_stages": 2, **plan.options})
    meta_attention_kernel[(table.num_cores,)](
        q, k_cache, v_cache, out,
        table.units, table.core_offsets, meta.query_start_loc, meta.seq_lens, meta.block_tables,
        meta.tree_mask_offsets if has_tree else dummy, meta.tree_masks if has_tree else dummy,
        part_m, part_l, part_acc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        hq, float(scale),
        GROUP=plan.group, HEAD_DIM=d, BLOCK_M=table.block_m, BLOCK_N=plan.block_n, KV_BLOCK=k_cache.shape[1],
        HAS_TREE=has_tree, SPLIT=split, NUM_SPLITS=table.num_splits, FP32_IEEE=q.dtype == torch.float32,
        **kw,
    )  # fmt: skip
    if split:
        rows = t * hq
        progs = min(rows, table.num_cores * 4)
        split_kv_reduce_kernel[(progs,)](
            part_m, part_l, part_acc, out, rows, hq, out.stride(0), out.stride(1), progs,
            NUM_SPLITS=table.num_splits, SPLITS_P2=triton.next_power_of_2(table.num_splits), HEAD_DIM=d,
            **launch_kwargs({"num_warps": 4}),
        )  # fmt: skip
    return out


_TY = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specs(profile) -> list[dict]:
    """Every (query tile of the menu, head dim 64/128, fp16/bf16) of the main kernel, causal and
    tree variants, plus the split-KV reduce."""
    att = profile.attention
    dts = ["fp16"] + (["bf16"] if (profile.data.get("supports") or {}).get("bf16", True) else [])
    ptrs = ("q_ptr", "k_ptr", "v_ptr", "o_ptr")
    ints = ("units_ptr", "core_offsets_ptr", "q_start_ptr", "seq_lens_ptr", "tables_ptr", "tree_off_ptr")
    strides = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks", "stride_kh",
               "stride_vb", "stride_vs", "stride_vh", "stride_bt", "num_q_heads")  # fmt: skip
    specs = []
    for ty in dts:
        for head_dim in (64, 128):
            for block_m in att["q_tiles"]:
                for tree in (False, True):
                    cx = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=int(att["kv_tile"]),
                              KV_BLOCK=int(profile.kv_block_size), HAS_TREE=tree, SPLIT=False, NUM_SPLITS=1,
                              FP32_IEEE=False)  # fmt: skip
                    sig = {p: f"*{ty}" for p in ptrs}
                    sig.update({p: "*i32" for p in ints})
                    sig.update(
                        {"tree_ptr": "*i8", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32"}
                    )
                    sig.update({k: "i32" for k in strides})
                    sig["scale"] = "fp32"
                    sig.update({k: "constexpr" for k in cx})
                    specs.append(dict(
                        name=f"meta_attention_{ty}_d{head_dim}_m{block_m}{'_tree' if tree else ''}",
                        fn=meta_attention_kernel, signature=sig, constexprs=cx,
                        num_warps=_num_warps(profile, block_m), num_stages=2, expect_tensor_cores=True,
                        divisible_by_16=["stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb",
                                         "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh"],
                        options=dict(att.get("options") or {}),
                    ))  # fmt: skip
        cx = dict(NUM_SPLITS=8, SPLITS_P2=8, HEAD_DIM=128)
        sig = {"part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "o_ptr": f"*{ty}"}
        sig.update({k: "i32" for k in ("n_rows", "num_q_heads", "stride_ot", "stride_oh", "num_programs")})
        sig.update({k: "constexpr" for k in cx})
        specs.append(dict(name=f"split_kv_reduce_{ty}", fn=split_kv_reduce_kernel, signature=sig, constexprs=cx,
                          num_warps=4, num_stages=1, expect_tensor_cores=False,
                          divisible_by_16=["stride_ot", "stride_oh"]))  # fmt: skip
    return specs
