"""Neox-style rotary position embedding of q and k in one launch.

Torch reference: ``portable_xy.backends.reference.rope_ref`` (semantics of ``Backend.rope``). With
``half = D / 2``, ``c = cos_sin[pos, :half]``, ``s = cos_sin[pos, half:]`` and ``x1 = x[:half]``,
``x2 = x[half:]`` of every head (computed in fp32, stored in the input dtype)::

    out = cat(x1 * c - x2 * s, x2 * c + x1 * s)

Shapes and layouts
    q         [T, Hq, D]   any token/head strides (e.g. views of the fused QKV output), unit last stride
    k         [T, Hkv, D]  likewise
    positions [T]          int64 (or int32)
    cos_sin   [max_pos, D] fp32, row-major: cos in the first half, sin in the second
    returns   new contiguous q, k (same dtypes)

One program handles tokens ``pid, pid + num_programs, ...``; per token it loads the cos/sin row
once and rotates the heads of q then of k in [BLOCK_H, BLOCK_HALF] tiles (a loop over head
chunks keeps the tile small on Ascend).

Constexprs: HALF (= D / 2), BLOCK_HALF (next power of two >= HALF), BLOCK_HQ, BLOCK_HK (head
chunk sizes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch_options, support_programs


@triton.jit
def _rope_heads(src, dst, stride_h, n_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_HALF: tl.constexpr):  # fmt: skip
    hs = tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_HALF)
    for h0 in range(0, n_heads, BLOCK_H):
        mask = (hs < n_heads - h0)[:, None] & (ds < HALF)[None, :]
        p = src + (h0 + hs)[:, None] * stride_h + ds[None, :]
        x1 = tl.load(p, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p + HALF, mask=mask, other=0.0).to(tl.float32)
        o = dst + (h0 + hs)[:, None] * (2 * HALF) + ds[None, :]
        tl.store(o, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=mask)
        tl.store(o + HALF, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cs_ptr,
    T, HQ, HK, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs, num_programs,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    ds = tl.arange(0, BLOCK_HALF)
    for t in tl.range(pid, T, num_programs):
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cs_row = cs_ptr + pos * stride_cs
        cos = tl.load(cs_row + ds, mask=ds < HALF, other=0.0)[None, :]
        sin = tl.load(cs_row + HALF + ds, mask=ds < HALF, other=0.0)[None, :]
        t64 = tl.cast(t, tl.int64)
        _rope_heads(q_ptr + t64 * stride_qt, qo_ptr + t64 * HQ * (2 * HALF), stride_qh, HQ, cos, sin,
                    HALF, BLOCK_HQ, BLOCK_HALF)  # fmt: skip
        _rope_heads(k_ptr + t64 * stride_kt, ko_ptr + t64 * HK * (2 * HALF), stride_kh, HK, cos, sin,
                    HALF, BLOCK_HK, BLOCK_HALF)  # fmt: skip


def block_h(n_heads: int, profile) -> int:
    cap = int(((profile.data.get("support") or {}) if profile is not None else {}).get("block_h", 16))
    return max(1, min(triton.next_power_of_2(n_heads), cap))


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    profile=None,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``Backend.rope``; returns new contiguous q and k (or fills the optional
    contiguous ``q_out`` / ``k_out``)."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    if k.shape[0] != T or k.shape[2] != D or positions.shape != (T,):
        raise ValueError(f"rope: q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)}")
    if D % 2 or cos_sin.shape[-1] != D:
        raise ValueError(f"rope: head dim {D} must be even and match cos_sin {tuple(cos_sin.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos_sin.stride(-1) != 1:
        cos_sin = cos_sin.contiguous()
    qo = q_out if q_out is not None else torch.empty((T, HQ, D), dtype=q.dtype, device=q.device)
    ko = k_out if k_out is not None else torch.empty((T, HK, D), dtype=k.dtype, device=k.device)
    if qo.shape != (T, HQ, D) or ko.shape != (T, HK, D) or not (qo.is_contiguous() and ko.is_contiguous()):
        raise ValueError("rope: q_out / k_out must be contiguous and shaped like q / k")
    if T == 0:
        return qo, ko
    progs = support_programs(T, profile) if profile is not None else T
    rope_kernel[(progs,)](
        q, k, qo, ko, positions, cos_sin,
        T, HQ, HK, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0), progs,
        HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2),
        BLOCK_HQ=block_h(HQ, profile), BLOCK_HK=block_h(HK, profile),
        **(launch_options(profile) if profile is not None else {}),
    )  # fmt: skip
    return qo, ko
