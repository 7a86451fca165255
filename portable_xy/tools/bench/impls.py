"""The implementations a kernel benchmark times, each as a zero-argument callable over prepared
inputs (set-up, plans and KV gathers happen outside the timed call).

GEMM ``y = x @ w^T``:
  ``smooth_gemm``  what the backend's ``linear`` runs: SmoothGEMM on the plan ``plan_gemm`` picks
                   from the menu (Triton backends), the torch reference op (``cpu``)
  ``single_tile``  SmoothGEMM with every row on one fixed tile (the largest of the menu)
  ``vendor``       the platform's vendor GEMM (``Platform.vendor_gemm``: torch.matmul on the vendor BLAS)

Weight-only quantized GEMM ``y = x @ dequant(W)^T`` (``W`` a :class:`QuantWeight`):
  ``quant_gemm``   the Triton W4A16 / W8A16 kernel on the plan ``plan_quant_gemm`` picks (split-K
                   for decode-sized M); ``cpu``: the torch reference (dequantize, then linear,
                   every call)
  ``smooth_gemm``  SmoothGEMM (``cpu``: the backend's linear) on the weight dequantized to x.dtype
                   beforehand (the 16-bit model the quantized one replaces)
  ``vendor``       ``torch.matmul`` / ``F.linear`` on that dequantized weight

Fused MoE ``out = sum_j w[t, j] * down_e(silu(gate_e(x)) * up_e(x))`` (routing made beforehand):
  ``fused_moe``    the backend's ``fused_moe`` on ``prepare_experts``' weights: the Triton fused-MoE
                   kernel (its host plan included in the timed call); ``cpu``: the CPU backend's op
  ``per_expert``   the base ``Backend.fused_moe`` loop in plain torch: tokens grouped by expert, then
                   per expert with rows ``F.linear``, SiLU-and-mul, ``F.linear`` and an ``index_add_``

Attention over the paged KV cache:
  ``meta_attention``  the backend's ``attention`` op: one launch for the whole mixed step
  ``per_stage``       the same op called once per stage (one launch per stage)
  ``vendor``          the platform's vendor attention (``Platform.vendor_attention``: flash-attn
                      varlen where importable on NVIDIA, the Ascend fused attention per sequence),
                      else torch SDPA per sequence; all over K/V gathered into contiguous tensors
                      beforehand (the gather is not timed)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...backends import AttnMetadata, Backend
from ...backends.base import group_by_expert
from ...backends.quant import QuantWeight, dequantize_ref
from ...backends.reference import gather_kv, stage_mask
from ...triton_kernels.gemm_plan import menu, plan_gemm, single_tile_plan

Fn = Callable[[], object]


# ------------------------------------------------------------------------------------------------
# GEMM
# ------------------------------------------------------------------------------------------------


def largest_tile(profile):
    """The menu tile with the most output elements (ties: more rows)."""
    return max(menu(profile), key=lambda t: (t.BLOCK_M * t.BLOCK_N, t.BLOCK_M))


def gemm_impls(backend: Backend, x: torch.Tensor, w: torch.Tensor) -> dict[str, tuple[Fn, str]]:
    """``{impl: (fn, detail)}`` for ``x [M, K] @ w [N, K]^T``."""
    M, K = x.shape
    N = w.shape[0]
    wp = backend.prepare_weight(w)
    out: dict[str, tuple[Fn, str]] = {}
    if backend.name == "cpu":
        out["smooth_gemm"] = (lambda: backend.linear(x, wp), "cpu backend linear (torch reference op)")
    else:
        sg = backend.k.smooth_gemm
        plan = plan_gemm(M, N, K, backend.profile, x.element_size())
        out["smooth_gemm"] = (lambda: sg.smooth_gemm(x, w, None, backend.profile, plan), plan.describe())
        single = single_tile_plan(M, N, K, largest_tile(backend.profile), backend.profile, x.element_size())
        out["single_tile"] = (lambda: sg.smooth_gemm(x, w, None, backend.profile, single), single.describe())
    out["vendor"] = backend.platform.vendor_gemm(x, w)
    return out


def quant_gemm_impls(backend: Backend, x: torch.Tensor, qw: QuantWeight) -> dict[str, tuple[Fn, str]]:
    """``{impl: (fn, detail)}`` for ``x [M, K] @ dequant(qw)^T`` (see the module doc); the
    dequantized baseline weight and every plan are made here, outside the timed calls."""
    M, K = x.shape
    N = qw.n
    wd = dequantize_ref(qw, x.dtype)
    out: dict[str, tuple[Fn, str]] = {}
    if backend.name == "cpu":
        out["quant_gemm"] = (lambda: F.linear(x, dequantize_ref(qw, x.dtype)),
                             f"{qw.qtype}: torch reference (dequantize_ref + F.linear per call)")  # fmt: skip
        wp = backend.prepare_weight(wd)
        out["smooth_gemm"] = (lambda: backend.linear(x, wp), f"cpu backend linear on {x.dtype} weights")
    else:
        from ...triton_kernels import quant_gemm as qg

        plan = qg.plan_quant_gemm(M, N, K, backend.profile, x.element_size())
        out["quant_gemm"] = (lambda: qg.quant_linear(x, qw, None, backend.profile, plan),
                             f"{qw.qtype}: {plan.describe()}")  # fmt: skip
        sg = backend.k.smooth_gemm
        dense = plan_gemm(M, N, K, backend.profile, x.element_size())
        out["smooth_gemm"] = (lambda: sg.smooth_gemm(x, wd, None, backend.profile, dense),
                              f"{x.dtype} weights: {dense.describe()}")  # fmt: skip
    out["vendor"] = backend.platform.vendor_gemm(x, wd)
    return out


def per_expert_moe(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """The base ``Backend.fused_moe`` loop in plain torch on stacked ``[E, 2I, H]`` / ``[E, H, I]``."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, rows, weights in group_by_expert(topk_ids, topk_weights, 0, w13.shape[0]):
        gate, up = F.linear(x.index_select(0, rows), w13[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, rows, h.float() * weights[:, None])
    return out.to(x.dtype)


def moe_impls(
    backend: Backend, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights, topk_ids
) -> dict[str, tuple[Fn, str]]:
    """``{impl: (fn, detail)}`` for one MoE layer call on stacked plain experts (see the module doc)."""
    p13 = backend.prepare_experts([backend.prepare_weight(w) for w in w13])
    p2 = backend.prepare_experts([backend.prepare_weight(w) for w in w2])
    if backend.name == "cpu":
        detail = "cpu backend fused_moe"
    else:
        plan = backend.k.fused_moe.plan_for(topk_ids, p13, p2, backend.profile, 0, x.element_size())
        detail = plan.describe()
    used = int(torch.unique(topk_ids).numel())
    return {
        "fused_moe": (lambda: backend.fused_moe(x, p13, p2, topk_weights, topk_ids), detail),
        "per_expert": (lambda: per_expert_moe(x, w13, w2, topk_weights, topk_ids),
                       f"torch loop over {used} experts with rows (F.linear)"),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------


def stage_meta(meta: AttnMetadata, s: int) -> AttnMetadata:
    """The token table of stage ``s`` alone."""
    a, b = int(meta.query_start_loc[s]), int(meta.query_start_loc[s + 1])
    dev = meta.query_start_loc.device
    return AttnMetadata(
        query_start_loc=torch.tensor([0, b - a], dtype=torch.int32, device=dev),
        seq_lens=meta.seq_lens[s : s + 1],
        block_tables=meta.block_tables[s : s + 1],
        slot_mapping=meta.slot_mapping[a:b],
        positions=meta.positions[a:b],
        query_lens_cpu=[meta.query_lens_cpu[s]],
        seq_lens_cpu=[meta.seq_lens_cpu[s]],
    )


def _gathered(q, k_cache, v_cache, meta):
    """Per stage: (q rows, K, V) with K/V gathered contiguous ``[kv_len, Hkv, D]``."""
    starts = meta.query_start_loc.tolist()
    out = []
    for s, (ql, sl) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        k = gather_kv(k_cache, meta.block_tables[s], sl).contiguous()
        v = gather_kv(v_cache, meta.block_tables[s], sl).contiguous()
        out.append((q[starts[s] : starts[s] + ql], k, v))
    return out


def _sdpa_vendor(q, k_cache, v_cache, meta, scale) -> Fn:
    calls = []
    for qs, k, v in _gathered(q, k_cache, v_cache, meta):
        ql, kl = qs.shape[0], k.shape[0]
        mask = None if ql == 1 or ql == kl else stage_mask(ql, kl, None, q.device)
        calls.append((qs.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, ql == kl > 1))

    def run():
        return [
            F.scaled_dot_product_attention(a, b, c, attn_mask=m, is_causal=causal, scale=scale, enable_gqa=True)
            for a, b, c, m, causal in calls
        ]

    return run


def vendor_attention(backend: Backend, q, k_cache, v_cache, meta, scale) -> tuple[Fn, str]:
    """The vendor library's attention for this step (the platform's), else torch SDPA per
    sequence (see the module doc)."""
    found = backend.platform.vendor_attention(q, k_cache, v_cache, meta, scale, _gathered(q, k_cache, v_cache, meta))
    if found is not None:
        return found
    return _sdpa_vendor(q, k_cache, v_cache, meta, scale), "torch SDPA per sequence (gathered KV)"


def attention_impls(
    backend: Backend, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata, scale: float
) -> dict[str, tuple[Fn, str]]:
    """``{impl: (fn, detail)}`` for one attention step (plans built here, outside the timed calls)."""
    hq, hkv, d = q.shape[1], k_cache.shape[2], q.shape[2]
    backend.prepare(meta, hq, hkv, d)
    starts = meta.query_start_loc.tolist()
    stages = []
    for s in range(meta.num_stages):
        sm = stage_meta(meta, s)
        backend.prepare(sm, hq, hkv, d)
        stages.append((q[starts[s] : starts[s + 1]], sm))
    one = "one launch" if backend.name != "cpu" else "cpu backend attention (torch reference op)"
    return {
        "meta_attention": (lambda: backend.attention(q, k_cache, v_cache, meta, scale), one),
        "per_stage": (
            lambda: [backend.attention(qs, k_cache, v_cache, sm, scale) for qs, sm in stages],
            f"{len(stages)} calls",
        ),
        "vendor": vendor_attention(backend, q, k_cache, v_cache, meta, scale),
    }
