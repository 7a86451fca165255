"""Paged KV-cache store by slot mapping.

Torch reference: ``portable_xy.backends.reference.store_kv_ref`` (semantics of ``Backend.store_kv``)::

    for t with slot_mapping[t] >= 0:  cache.view(-1, Hkv, D)[slot_mapping[t]] = kv[t]

Shapes and layouts
    k, v          [T, Hkv, D]   any token/head strides, unit last stride
    k/v_cache     [num_blocks, block_size, Hkv, D], contiguous; slot = block * block_size + offset
    slot_mapping  [T] int64 (or int32); -1 = do not store (e.g. a token whose KV is cached already)

One program copies tokens ``pid, pid + num_programs, ...``; a token is one [BLOCK_H, BLOCK_D]
tile for K and one for V. The cache offset ``slot * Hkv * D`` is 64-bit (caches can exceed 2^31
elements); in-tile offsets are 32-bit.

Constexprs: BLOCK_H, BLOCK_D (next powers of two of Hkv and D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch_options, support_programs


@triton.jit
def store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    T, H, D, stride_kt, stride_kh, stride_vt, stride_vh, num_programs,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    hs = tl.arange(0, BLOCK_H)[:, None]
    ds = tl.arange(0, BLOCK_D)[None, :]
    mask = (hs < H) & (ds < D)
    for t in tl.range(pid, T, num_programs):
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            dst = slot * H * D + (hs * D + ds)
            t64 = tl.cast(t, tl.int64)
            k = tl.load(k_ptr + t64 * stride_kt + hs * stride_kh + ds, mask=mask)
            v = tl.load(v_ptr + t64 * stride_vt + hs * stride_vh + ds, mask=mask)
            tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    profile=None,
) -> None:
    """Same contract as ``Backend.store_kv`` (writes the caches in place)."""
    T, H, D = k.shape
    if v.shape != k.shape or k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != (H, D):
        raise ValueError(f"store_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, cache {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv: the KV caches must be contiguous")
    if slot_mapping.shape != (T,):
        raise ValueError(f"store_kv: slot_mapping {tuple(slot_mapping.shape)} != ({T},)")
    if T == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    progs = support_programs(T, profile) if profile is not None else T
    store_kv_kernel[(progs,)](
        k, v, k_cache, v_cache, slot_mapping,
        T, H, D, k.stride(0), k.stride(1), v.stride(0), v.stride(1), progs,
        BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
        **(launch_options(profile) if profile is not None else {}),
    )  # fmt: skip
