"""Mixture-of-experts families on the Llama decoder: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

Attention is the Llama family's (QKV bias for Qwen2-MoE, per-head q/k norm for Qwen3-MoE,
whole-width q/k norm and ``clip_qkv`` for OLMoE); the MLP of a sparse layer is a router, the
routed experts and, for Qwen2-MoE, a shared expert scaled by a sigmoid gate. HF transformers is the
oracle: fp32 softmax over all experts, top-k, renormalised over the k when ``norm_topk_prob``
(always for Mixtral), each chosen expert's SwiGLU MLP scaled by its weight and summed.

The experts run through :meth:`Backend.fused_moe` (the grouped C / torch path on CPU, the fused
Triton meta-kernel on devices); the router and the shared expert's gate are one GEMM.

Checkpoint layouts: per-expert tensors (``experts.N.{gate,up,down}_proj`` or Mixtral's
``block_sparse_moe.experts.N.{w1,w3,w2}``), the fused 3D ``experts.gate_up_proj`` /
``experts.down_proj`` of transformers 5 (``weights.py`` exposes them per expert), and GGUF's
stacked ``ffn_{gate,up,down}_exps`` (kept quantized where the backend runs the blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .layers import WeightLoader
from .llama import DecoderLayer, DenseMLP, LlamaForCausalLM, llama_config
from .registry import UnsupportedModelError


def moe_config(
    cfg: dict[str, Any], qkv_bias: bool | None = None, qk_norm: bool = False, qk_norm_full: bool = False,
    shared_expert: bool = False, always_renormalize: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The family's config fields from an HF config (see :class:`~.config.ModelConfig`)."""
    arch = (cfg.get("architectures") or ["?"])[0]
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        raise UnsupportedModelError(f"{arch} with sliding_window={cfg['sliding_window']} is not supported")
    num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    if num_experts <= 0 or not 0 < top_k <= num_experts:
        raise UnsupportedModelError(f"{arch}: num_experts={num_experts}, num_experts_per_tok={top_k}")
    layers = int(cfg["num_hidden_layers"])
    step = int(cfg.get("decoder_sparse_step") or 1)
    only = set(cfg.get("mlp_only_layers") or [])
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) if shared_expert else 0
    clip = cfg.get("clip_qkv") if qk_norm_full else None
    return {
        **llama_config(cfg, qkv_bias=qkv_bias, qk_norm=qk_norm or qk_norm_full),
        "qk_norm_full": qk_norm_full,
        "clip_qkv": None if clip is None else float(clip),
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
        "shared_expert_intermediate_size": shared,
        "norm_topk_prob": always_renormalize or bool(cfg.get("norm_topk_prob", False)),
        "dense_layers": tuple(i for i in range(layers) if i in only or (i + 1) % step),
    }


@dataclass
class SparseMoE:
    router: object  # [E (+ 1: the shared expert's gate), H] GEMM weight
    w13: object  # this rank's experts' merged gate-up [2 I, H] weights (Backend.prepare_experts)
    w2: object  # their down [H, I] weights
    shared: DenseMLP | None  # Qwen2-MoE's shared expert


_EXPERT_GGUF = {
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.{e}.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.{e}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{e}.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}


class MoEForCausalLM(LlamaForCausalLM):
    """A Llama-attention decoder whose sparse layers run routed experts (see the module doc)."""

    # GGUF: per-layer names; ``{e}`` names are one 3D tensor, one expert per index of its first dim
    gguf_layer_names: ClassVar[dict[str, str]] = {**LlamaForCausalLM.gguf_layer_names, **_EXPERT_GGUF}
    gguf_permuted_qk: ClassVar[frozenset[str]] = frozenset({"llama"})
    # checkpoint names of a sparse layer's block, router and experts: (block, gate, up, down)
    expert_names: ClassVar[tuple[str, ...]] = ("mlp", "gate_proj", "up_proj", "down_proj")

    def load_mlp(self, load: WeightLoader, p: str) -> object:
        c, sh = self.config, self.shard
        if int(p.split(".")[2]) in c.dense_layers:
            return super().load_mlp(load, p)
        block, *parts = self.expert_names
        if f"{p}{block}.gate.weight" not in load.names:  # transformers 5 / GGUF names every family "mlp"
            block, parts = "mlp", ["gate_proj", "up_proj", "down_proj"]
        m = f"{p}{block}."
        router = [load.tensor(m + "gate.weight")]
        if c.shared_expert_intermediate_size:
            router.append(load.tensor(m + "shared_expert_gate.weight"))
        inter = (sh.moe_inter_start, sh.moe_inter)
        w13, w2 = [], []
        for e in range(sh.expert_start, sh.expert_start + sh.num_local_experts):
            gate, up, down = (f"{m}experts.{e}.{n}.weight" for n in parts)
            w13.append(load.gemm(load.column(gate, inter), load.column(up, inter)))
            w2.append(load.row(down, inter))
        be = self.backend
        shared = None
        if c.shared_expert_intermediate_size:
            shared = self.load_dense_mlp(load, m + "shared_expert.", (sh.shared_inter_start, sh.shared_inter))
        return SparseMoE(be.prepare_weight(torch.cat(router).contiguous()), be.prepare_experts(w13),
                         be.prepare_experts(w2), shared)  # fmt: skip

    def project_qkv(self, layer: DecoderLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        if not c.qk_norm_full:
            return super().project_qkv(layer, x)
        be, sh, d, t = self.backend, self.shard, c.head_dim, x.shape[0]
        hq, hkv = sh.num_heads, sh.num_kv_heads
        q, k, v = be.linear(x, layer.qkv, layer.qkv_bias).split([hq * d, hkv * d, hkv * d], dim=-1)
        q = self._full_width_norm(q, layer.q_norm, c.num_heads * d)
        k = self._full_width_norm(k, layer.k_norm, c.num_kv_heads * d)
        if c.clip_qkv is not None:
            q, k, v = (a.clamp(-c.clip_qkv, c.clip_qkv) for a in (q, k, v))
        return q.reshape(t, hq, d), k.reshape(t, hkv, d), v.reshape(t, hkv, d)

    def _full_width_norm(self, x: torch.Tensor, weight: torch.Tensor, width: int) -> torch.Tensor:
        """RMSNorm over all ``width`` columns of the projection, of which this rank holds ``x``'s
        (the sum of squares is all-reduced across ranks; replicated KV heads count once)."""
        if self.group is None:
            return self.backend.rms_norm(x.contiguous(), weight, self.config.rms_norm_eps)[0]
        xf = x.float()
        sq = xf.pow(2).sum(-1, keepdim=True)
        local = x.shape[-1] * self.group.size
        sq = self.group.all_reduce(sq) * (width / local)  # replicated heads are summed size/width times
        return (xf * torch.rsqrt(sq / width + self.config.rms_norm_eps)).to(x.dtype) * weight

    def mlp(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        moe = layer.mlp
        if not isinstance(moe, SparseMoE):
            return super().mlp(layer, x)
        be, c = self.backend, self.config
        logits = be.linear(x, moe.router)
        e = c.num_experts
        weights, ids = be.moe_route(logits[:, :e], c.num_experts_per_tok, c.norm_topk_prob)
        out = be.fused_moe(x, moe.w13, moe.w2, weights, ids, self.shard.expert_start)
        if moe.shared is not None:
            out = out + torch.sigmoid(logits[:, e:]) * self.dense_mlp(moe.shared, x)
        return out


class MixtralForCausalLM(MoEForCausalLM):
    expert_names: ClassVar[tuple[str, ...]] = ("block_sparse_moe", "w1", "w3", "w2")
