"""One Llama-family decoder for Llama 2/3, SmolLM2, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

The forward pass is written against the backend op interface, so the same code runs on the torch
reference ops, the Triton interpreter, CUDA or Ascend. QKV and gate/up projections are fused into
one GEMM each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..backends import AttnMetadata, Backend
from ..backends.quant import QBLOCK, QuantWeight, dequantize_ref
from ..distributed.sharding import ShardPlan
from .config import ModelConfig
from .weights import WeightSource

if TYPE_CHECKING:
    from ..distributed.group import TPGroup


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
    """The decoder on ``backend``, optionally one rank's shard of it (``shard`` and ``group``, see
    ``distributed/sharding.py``): its heads, its slice of the MLP and of the vocabulary, with an
    all-reduce after the embedding, O and down, and the logits gathered on rank 0."""

    def __init__(
        self,
        config: ModelConfig,
        weights: WeightSource,
        backend: Backend,
        dtype: torch.dtype,
        max_positions: int,
        shard: ShardPlan | None = None,
        group: TPGroup | None = None,
        quantization: str | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.dtype = dtype
        self.group = group
        sh = self.shard = shard or ShardPlan.make(config)
        dev = backend.device
        names = weights.names()

        def take(name: str, dim: int | None = None, start: int = 0, size: int = 0, required: bool = True):
            if name not in names:
                if required:
                    raise ValueError(f"weight {name!r} is missing from the checkpoint")
                return None
            if sh.size == 1:
                dim = None
            t = weights.get(name, dim, start, start + size) if dim is not None else weights.get(name)
            return t.to(device=dev, dtype=dtype).contiguous()

        # GEMM weights stored as Q4_0 / Q4_1 / Q8_0 stay quantized where the backend runs them
        keep = quantization is not None and dtype in backend.quantized_dtypes()
        self.dequantized: dict[str, list[str]] = {}  # storage type -> GEMM weights dequantized at load

        def take_q(name: str, dim: int | None = None, start: int = 0, size: int = 0):
            if keep and name in names and weights.quant_type(name) is not None:
                d = None if sh.size == 1 else dim
                if d != 1 or (start % QBLOCK == 0 and size % QBLOCK == 0):
                    w = weights.get_quant(name, d, start, start + size) if d is not None else weights.get_quant(name)
                    return w.to(dev)
            if keep and name in names:
                self.dequantized.setdefault(weights.storage_type(name), []).append(name)
            return take(name, dim, start, size, required=name != "lm_head.weight" or not config.tie_word_embeddings)

        def gemm(*parts) -> object:
            """One GEMM weight from row blocks (fused QKV / gate-up), prepared for the backend."""
            if all(isinstance(p, QuantWeight) for p in parts) and len({(p.qtype, p.k) for p in parts}) == 1:
                return backend.prepare_quant_weight(QuantWeight.cat(list(parts)), quantization == "gguf")
            mixed = [p for p in parts if isinstance(p, QuantWeight)]
            if mixed:  # block types that differ within one fused GEMM
                kinds = "+".join(sorted({p.qtype for p in mixed}))
                self.dequantized.setdefault(kinds, []).append(f"{len(parts)} fused")
            plain = [dequantize_ref(p, dtype) if isinstance(p, QuantWeight) else p for p in parts]
            return backend.prepare_weight(torch.cat(plain).contiguous() if len(plain) > 1 else plain[0])

        c, d = config, config.head_dim
        self._check_shapes(weights)
        q_rows = (sh.q_start * d, sh.num_heads * d)
        kv_rows = (sh.kv_start * d, sh.num_kv_heads * d)
        inter = (sh.inter_start, sh.intermediate)
        self.embed = self._vocab_rows(take_q("model.embed_tokens.weight", 0, sh.vocab_start, sh.vocab_rows))
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            q = take_q(p + "self_attn.q_proj.weight", 0, *q_rows)
            k, v = (take_q(p + f"self_attn.{n}_proj.weight", 0, *kv_rows) for n in "kv")
            bias = None
            if c.qkv_bias:
                bias = torch.cat([take(p + "self_attn.q_proj.bias", 0, *q_rows),
                                  *(take(p + f"self_attn.{n}_proj.bias", 0, *kv_rows) for n in "kv")])  # fmt: skip
            gate, up = (take_q(p + f"mlp.{n}_proj.weight", 0, *inter) for n in ("gate", "up"))
            self.layers.append(
                DecoderLayer(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=gemm(q, k, v),
                    qkv_bias=bias,
                    q_norm=take(p + "self_attn.q_norm.weight") if c.qk_norm else None,
                    k_norm=take(p + "self_attn.k_norm.weight") if c.qk_norm else None,
                    o_proj=gemm(take_q(p + "self_attn.o_proj.weight", 1, *q_rows)),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=gemm(gate, up),
                    down=gemm(take_q(p + "mlp.down_proj.weight", 1, *inter)),
                )
            )
        self.norm = take("model.norm.weight")
        lm_head = take_q("lm_head.weight", 0, sh.vocab_start, sh.vocab_rows)
        self.lm_head = gemm(self.embed if lm_head is None else self._vocab_rows(lm_head))

        self.cos_sin = c.rope_cos_sin(max_positions).to(dev)
        self.scale = c.head_dim**-0.5

    def _vocab_rows(self, w: torch.Tensor | QuantWeight) -> torch.Tensor | QuantWeight:
        """A vocabulary shard zero-padded to ``vocab_per_rank`` rows (only under tensor parallelism)."""
        pad = self.shard.vocab_per_rank - w.shape[0]
        if self.shard.size == 1 or pad == 0:
            return w
        if isinstance(w, QuantWeight):
            z = w.rows(0, 1)
            zero = QuantWeight(w.qtype, z.qs.new_zeros(pad, z.qs.shape[1]), z.d.new_zeros(pad, z.d.shape[1]),
                               z.m.new_zeros(pad, z.m.shape[1]), pad, w.k)  # fmt: skip
            return QuantWeight.cat([w, zero])
        return torch.cat([w, w.new_zeros(pad, w.shape[1])])

    def _embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the embedding table (a quantized table dequantizes only those rows)."""
        e = self.embed
        if isinstance(e, QuantWeight):
            picked = QuantWeight(e.qtype, e.qs[ids], e.d[ids], e.m[ids], ids.shape[0], e.k)
            return dequantize_ref(picked, self.dtype)
        return e[ids]

    def _check_shapes(self, weights: WeightSource) -> None:
        c = self.config
        want = {
            "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
            "model.layers.0.self_attn.q_proj.weight": (c.num_heads * c.head_dim, c.hidden_size),
            "model.layers.0.self_attn.k_proj.weight": (c.num_kv_heads * c.head_dim, c.hidden_size),
            "model.layers.0.mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        }
        names = weights.names()
        for name, shape in want.items():
            if name in names and weights.shape(name) != shape:
                raise ValueError(f"weight {name!r} has shape {weights.shape(name)}, the config implies {shape}")

    def forward(
        self, input_ids: torch.Tensor, meta: AttnMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Hidden states ``[T, H]`` (after the final norm) for the step's ``T`` tokens."""
        be, c, sh, group = self.backend, self.config, self.shard, self.group
        t = input_ids.shape[0]
        hq, hkv, d = sh.num_heads, sh.num_kv_heads, c.head_dim
        if group is None:
            h = self._embed_rows(input_ids)
        else:  # vocab-parallel: each rank looks up its own ids, zeros elsewhere, summed
            local = input_ids - sh.vocab_start
            mine = (local >= 0) & (local < sh.vocab_rows)
            rows = self._embed_rows(torch.where(mine, local, 0))
            h = group.all_reduce(rows * mine[:, None].to(rows.dtype))
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
            if group is not None:
                group.all_reduce(h)
            x, residual = be.rms_norm(h, layer.post_norm, c.rms_norm_eps, residual)
            h = be.linear(be.silu_and_mul(be.linear(x, layer.gate_up)), layer.down)
            if group is not None:
                group.all_reduce(h)
        return be.rms_norm(h, self.norm, c.rms_norm_eps, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """fp32 logits ``[N, V]`` for the selected hidden rows (under tensor parallelism: gathered
        on rank 0, ``None`` on the other ranks)."""
        out = self.backend.linear(hidden, self.lm_head).float()
        if self.group is None:
            return out
        full = self.group.gather_rows(out)
        return None if full is None else full[:, : self.config.vocab_size]
