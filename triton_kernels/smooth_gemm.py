"""SmoothGEMM: ``y[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N])`` for any M from a fixed tile menu.

Torch reference: ``portable_xy.backends.reference.linear_ref``.

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
    BLOCK_M, BLOCK_N, BLOCK_K  the tile (from the profile's ``gemm.tiles`` menu, planned by
                               :mod:`.gemm_plan`)
    GROUP_M     grouped ("swizzled") tile order for L2 reuse: GROUP_M row-tiles share each
                column sweep (1 = plain row-major order over tiles); profile ``gemm.group_m``
    HAS_BIAS    fuse the bias add
    EVEN_K      K % BLOCK_K == 0: the K loop needs no mask
    FP32_IEEE   fp32 operands: ``tl.dot(..., input_precision="ieee")``
    PERSISTENT  grid = ``num_programs`` programs (the profile's core count on Ascend), each
                looping over tiles ``pid, pid + num_programs, ...``; otherwise one program/tile

Compiled-code notes (Triton 3.9, ``portable-xy kernels aot-report``): every CUDA menu tile compiles to
HMMA (sm80) / HGMMA (sm90, BLOCK_M >= 64) without spills *given* 16-aligned pointers, N, K and
row strides (what the JIT specialises on for model shapes); without those hints the loads are
scalar and the 64x128 / 128x256 tiles spill. The PERSISTENT variant needs more registers (the
128x256 tile spills on sm90), which is why only the Ascend profiles turn it on. fp32 operands
use FMA (no tensor cores) and can spill on sm80 (32x64x64: 48 B): fp32 is for CPU/interpreter
parity, not GPU speed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm_plan import GemmPlan, plan_gemm
from .launch import launch_kwargs

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
# host entry point
# ------------------------------------------------------------------------------------------------


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
