"""The definition of every backend op in plain torch: the oracle every kernel and fast path is
tested against.

Each function is the semantics of the :class:`~portable_xy.backends.base.Backend` op of the same
name (``linear_ref`` is ``Backend.linear``...), written for clarity, not speed: no state, no
caches, fp32 maths where the op promises it. The ``cpu`` backend (``cpu.py``), the Triton kernels
(``portable_xy.triton_kernels``) and the C ops (``cpu_native.c``) are all checked against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttnMetadata, Backend
from .profile import Profile, load_profile


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``Backend.linear``: ``x @ weight.T (+ bias)``."""
    return F.linear(x, weight, bias)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``Backend.rms_norm``: fp32 RMSNorm, cast to ``x.dtype``, times ``weight``; with ``residual``
    the input is ``x + residual`` first, returned as the new residual."""
    if residual is not None:
        residual = x + residual  # kept in promote(x, residual): an fp32 residual stream stays fp32
        src = residual
    else:
        src = x
    xf = src.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf.to(x.dtype) * weight), residual


def rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Backend.rope``: neox-style rotation of q and k in fp32, cast back."""
    half = cos_sin.shape[-1] // 2
    cs = cos_sin[positions]
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``Backend.silu_and_mul``: ``silu(gate) * up`` of the two halves of ``x``."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """``Backend.store_kv``: row ``t`` of k / v into slot ``slot_mapping[t]`` (skipped when -1)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence: ``[length, Hkv, D]`` read via its block table."""
    bs = cache.shape[1]
    nblk = (length + bs - 1) // bs
    return cache[block_table[:nblk].long()].flatten(0, 1)[:length]


def stage_mask(q_len: int, kv_len: int, tree: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Boolean ``[q_len, kv_len]`` visibility: all history columns, then causal (or ``tree``)
    over the stage's own new columns."""
    hist = kv_len - q_len
    if tree is None:
        rows = torch.arange(q_len, device=device)[:, None] + hist
        return torch.arange(kv_len, device=device)[None, :] <= rows
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    mask[:, hist:] = tree.bool()
    return mask


def attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata, scale: float
) -> torch.Tensor:
    """Per-stage reference: gather the stage's K/V, masked softmax(QK^T * scale) V in fp32."""
    out = torch.empty_like(q)
    hq, hkv = q.shape[1], k_cache.shape[2]
    starts = meta.query_start_loc.tolist()
    for s, (q_len, kv_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if q_len == 0:
            continue
        qs = q[starts[s] : starts[s] + q_len].float()
        k = gather_kv(k_cache, meta.block_tables[s], kv_len).float().repeat_interleave(hq // hkv, dim=1)
        v = gather_kv(v_cache, meta.block_tables[s], kv_len).float().repeat_interleave(hq // hkv, dim=1)
        mask = stage_mask(q_len, kv_len, tree_mask(meta, s, q_len), q.device)
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        out[starts[s] : starts[s] + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


def tree_mask(meta: AttnMetadata, s: int, q_len: int) -> torch.Tensor | None:
    """Stage ``s``'s ``[q_len, q_len]`` tree mask, or None when it is causal."""
    if meta.tree_mask_offsets is None:
        return None
    off = int(meta.tree_mask_offsets[s])
    if off < 0:
        return None
    return meta.tree_masks[off : off + q_len * q_len].view(q_len, q_len)


def sample_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """Inverse-CDF sampling over the kept set in descending-probability order; see Backend.sample."""
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    greedy = temperature <= 0
    if bool(greedy.any()):
        out[greedy] = logits[greedy].argmax(-1)
    for i in torch.nonzero(~greedy).flatten().tolist():
        probs = torch.softmax(logits[i].float() / float(temperature[i]), -1)
        k = int(top_k[i])
        if 0 < k < probs.numel():
            vals, idx = torch.topk(probs, k)
        else:
            vals, idx = torch.sort(probs, descending=True, stable=True)
        keep = torch.ones_like(vals, dtype=torch.bool)
        p = float(top_p[i])
        if p < 1.0:
            # keep the smallest prefix whose mass reaches p (always at least one token)
            before = torch.cumsum(vals, 0) - vals
            keep &= before < p * vals.sum()
        mp = float(min_p[i])
        if mp > 0.0:
            keep &= vals >= mp * vals[0]
        vals = vals[keep]
        cdf = torch.cumsum(vals, 0)
        j = int(torch.searchsorted(cdf, float(uniform[i]) * cdf[-1], right=True).clamp(max=vals.numel() - 1))
        out[i] = idx[keep][j]
    return out


def moe_route_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``Backend.moe_route``: fp32 softmax over the experts, ``torch.topk``, optional renormalisation."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_start: int = 0,
) -> torch.Tensor:
    """``Backend.fused_moe`` on stacked plain weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (experts
    ``expert_start ...``), dense: every expert's SwiGLU MLP on every token in fp32, scaled by the
    token's weight for that expert (0 where not chosen) and summed; returned in ``x.dtype``."""
    xf = x.float()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        gate = ((topk_ids == e + expert_start) * topk_weights.float()).sum(-1)  # [T]
        h = silu_and_mul_ref(xf @ w13[e].float().T) @ w2[e].float().T
        out += gate[:, None] * h
    return out.to(x.dtype)


class ReferenceBackend(Backend):
    """The functions above as a backend on CPU tensors: the oracle in backend form, for tests that
    compare whole backends op by op."""

    name = "reference"

    def __init__(self, profile: Profile | None = None) -> None:
        super().__init__(torch.device("cpu"), profile if profile is not None else load_profile("cpu", tuned=False))

    def linear(self, x, weight, bias=None):
        return linear_ref(x, weight, bias)

    def rms_norm(self, x, weight, eps, residual=None):
        return rms_norm_ref(x, weight, eps, residual)

    def rope(self, q, k, positions, cos_sin):
        return rope_ref(q, k, positions, cos_sin)

    def silu_and_mul(self, x):
        return silu_and_mul_ref(x)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)

    def attention(self, q, k_cache, v_cache, meta, scale):
        return attention_ref(q, k_cache, v_cache, meta, scale)

    def sample(self, logits, temperature, top_k, top_p, min_p, uniform):
        return sample_ref(logits, temperature, top_k, top_p, min_p, uniform)
