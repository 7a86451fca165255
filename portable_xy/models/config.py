"""Model configuration, normalised from an HF ``config.json`` or GGUF metadata (the family's own
fields through its registry entry, ``registry.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .registry import UnsupportedModelError, entry_for


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    # the family's own fields (set by its registry adapter; defaults: a dense Llama)
    qk_norm_full: bool = False  # q/k RMSNorm over the whole projected width (OLMoE), not per head
    clip_qkv: float | None = None  # clamp q, k, v to [-clip, clip] (OLMoE)
    num_experts: int = 0  # mixture of experts: routed experts per MoE layer (0: dense MLPs)
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert (0: none)
    norm_topk_prob: bool = False  # renormalise the top-k routing weights
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP instead

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """The shared fields from an HF ``config.json``; the family's own (``qkv_bias``,
        ``qk_norm``, the MoE fields...) from its registry entry's adapter, which also refuses what
        it cannot run."""
        entry = entry_for(cfg.get("architectures") or [], cfg.get("model_type"))
        arch = entry.architecture
        if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            raise UnsupportedModelError(f"{arch} with use_sliding_window=True is not supported")
        family = entry.adapt(cfg)
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size") or 0),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=rope,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            **family,
        )

    def rope_cos_sin(self, max_positions: int) -> torch.Tensor:
        """``[max_positions, head_dim]`` fp32 table: ``cat(cos, sin)`` of the rotation angles."""
        inv_freq, attn_factor = rope_inv_freq(self)
        # fp32 throughout, as HF computes it, so the tables agree bit for bit with the oracle
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())
        return torch.cat((freqs.cos() * attn_factor, freqs.sin() * attn_factor), dim=-1)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the config's RoPE type (default, linear, llama3, yarn) and the
    attention scaling factor applied to cos/sin (1 except for yarn). Mirrors HF's definitions."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling
    kind = sc.get("rope_type", sc.get("type", "default")) if sc else "default"
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(sc["factor"]), 1.0
    if kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled), 1.0
    if kind == "yarn":
        factor = float(sc["factor"])
        old = float(sc.get("original_max_position_embeddings", cfg.max_position_embeddings))
        beta_fast, beta_slow = float(sc.get("beta_fast", 32)), float(sc.get("beta_slow", 1))
        mscale = sc.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

        def corr(rot: float) -> float:
            return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(beta_fast)), 0)
        high = min(math.ceil(corr(beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        extrap = 1 - ramp
        return inv / factor * (1 - extrap) + inv * extrap, float(mscale)
    raise UnsupportedModelError(f"rope type {kind!r} is not supported; supported: default, linear, llama3, yarn")
