"""One Llama-family decoder for Llama 2/3, SmolLM2, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

The forward pass is written against the backend op interface, so the same code runs on the torch
reference ops, the Triton interpreter, CUDA or Ascend. QKV and gate/up projections are fused into
one GEMM each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import AttnMetadata, Backend
from .config import ModelConfig


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, H]; GEMM weights as returned by Backend.prepare_weight
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor  # [H, Hq * D]
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 I, H]
    down: torch.Tensor  # [H, I]


class LlamaForCausalLM:
    def __init__(
        self,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        backend: Backend,
        dtype: torch.dtype,
        max_positions: int,
    ) -> None:
        self.config = config
        self.backend = backend
        dev = backend.device

        def take(name: str, required: bool = True) -> torch.Tensor | None:
            t = state.pop(name, None)
            if t is None:
                if required:
                    raise ValueError(f"weight {name!r} is missing from the checkpoint")
                return None
            return t.to(device=dev, dtype=dtype).contiguous()

        c = config
        self._check_shapes(state)
        self.embed = take("model.embed_tokens.weight")
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            q, k, v = (take(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            bias = None
            if c.qkv_bias:
                bias = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            gate, up = take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")
            self.layers.append(
                DecoderLayer(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=backend.prepare_weight(torch.cat([q, k, v]).contiguous()),
                    qkv_bias=bias,
                    q_norm=take(p + "self_attn.q_norm.weight") if c.qk_norm else None,
                    k_norm=take(p + "self_attn.k_norm.weight") if c.qk_norm else None,
                    o_proj=backend.prepare_weight(take(p + "self_attn.o_proj.weight")),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=backend.prepare_weight(torch.cat([gate, up]).contiguous()),
                    down=backend.prepare_weight(take(p + "mlp.down_proj.weight")),
                )
            )
        self.norm = take("model.norm.weight")
        lm_head = take("lm_head.weight", required=not c.tie_word_embeddings)
        self.lm_head = backend.prepare_weight(self.embed if lm_head is None else lm_head)
        self.cos_sin = c.rope_cos_sin(max_positions).to(dev)
        self.scale = c.head_dim**-0.5

    def _check_shapes(self, state: dict[str, torch.Tensor]) -> None:
        c = self.config
        want = {
            "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
            "model.layers.0.self_attn.q_proj.weight": (c.num_heads * c.head_dim, c.hidden_size),
            "model.layers.0.self_attn.k_proj.weight": (c.num_kv_heads * c.head_dim, c.hidden_size),
            "model.layers.0.mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        }
        for name, shape in want.items():
            got = state.get(name)
            if got is not None and tuple(got.shape) != shape:
                raise ValueError(f"weight {name!r} has shape {tuple(got.shape)}, the config implies {shape}")

    def forward(
        self, input_ids: torch.Tensor, meta: AttnMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Hidden states ``[T, H]`` (after the final norm) for the step's ``T`` tokens."""
        be, c = self.backend, self.config
        t = input_ids.shape[0]
        hq, hkv, d = c.num_heads, c.num_kv_heads, c.head_dim
        h = self.embed[input_ids]
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x, residual = be.rms_norm(h, layer.input_norm, c.rms_norm_eps, residual)
            if residual is None:
                # the residual stream is kept in fp32 whatever the activation dtype: 30 bf16
                # adds lose enough precision to flip near-tied greedy choices of small models
                residual = h.float()
            qkv = be.linear(x, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
            q, k, v = q.reshape(t, hq, d), k.reshape(t, hkv, d), v.reshape(t, hkv, d)
            if layer.q_norm is not None:
                q = be.rms_norm(q, layer.q_norm, c.rms_norm_eps)[0]
                k = be.rms_norm(k, layer.k_norm, c.rms_norm_eps)[0]
            q, k = be.rope(q, k, meta.positions, self.cos_sin)
            be.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            o = be.attention(q, k_cache, v_cache, meta, self.scale)
            h = be.linear(o.reshape(t, hq * d), layer.o_proj)
            x, residual = be.rms_norm(h, layer.post_norm, c.rms_norm_eps, residual)
            h = be.linear(be.silu_and_mul(be.linear(x, layer.gate_up)), layer.down)
        return be.rms_norm(h, self.norm, c.rms_norm_eps, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[N, V]`` for the selected hidden rows."""
        return self.backend.linear(hidden, self.lm_head).float()
