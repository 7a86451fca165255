"""The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

The forward pass is written against the backend op interface, so the same code runs on the torch
reference ops, the Triton interpreter or a device. QKV and gate/up projections are fused into one
GEMM each. Families that keep this attention and change the MLP (MoE) subclass it and override
:meth:`LlamaForCausalLM.load_mlp` and :meth:`LlamaForCausalLM.mlp`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..backends import AttnMetadata, Backend
from .config import ModelConfig
from .layers import VocabParallelEmbedding, WeightLoader
from .registry import UnsupportedModelError
from .sharding import ShardPlan
from .weights import WeightSource

if TYPE_CHECKING:
    from ..distributed.group import TPGroup


def llama_config(cfg: dict[str, Any], qkv_bias: bool | None = None, qk_norm: bool = False) -> dict[str, Any]:
    """The family's config fields from an HF config: ``qkv_bias`` fixed by the architecture (Qwen2)
    or read from ``attention_bias`` (Llama, Mistral); ``qk_norm`` (Qwen3)."""
    arch = (cfg.get("architectures") or ["?"])[0]
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{arch} with mlp_bias=True is not supported")
    return {"qkv_bias": bool(cfg.get("attention_bias", False)) if qkv_bias is None else qkv_bias, "qk_norm": qk_norm}


@dataclass
class DenseMLP:
    gate_up: object  # [2 I, H]; GEMM weights as returned by Backend.prepare_weight
    down: object  # [H, I]


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    qkv: object  # [(Hq + 2 Hkv) * D, H]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: object  # [H, Hq * D]
    post_norm: torch.Tensor
    mlp: object  # the family's MLP weights: DenseMLP here (load_mlp / mlp)


class LlamaForCausalLM:
    """The decoder on ``backend``, optionally one rank's shard of it (``shard`` and ``group``, see
    ``models/sharding.py``): its heads, its slice of the MLP and of the vocabulary, with an
    all-reduce after the embedding, O and down, and the logits gathered on rank 0."""

    # GGUF tensor names -> HF names (per layer under ``blk.N.``, and top-level)
    gguf_layer_names: ClassVar[dict[str, str]] = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
        "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    gguf_top_names: ClassVar[dict[str, str]] = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    # GGUF architectures whose Q/K rows llama.cpp permuted for its RoPE (undone at load)
    gguf_permuted_qk: ClassVar[frozenset[str]] = frozenset({"llama"})
    shard_plan: ClassVar[type[ShardPlan]] = ShardPlan

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
        sh = self.shard = shard or self.shard_plan.make(config)
        load = WeightLoader(weights, backend, dtype, sh, quantization)
        self.dequantized = load.dequantized
        self._check_shapes(weights)
        self.vocab = VocabParallelEmbedding(load, "model.embed_tokens.weight", config.vocab_size, group)
        self.layers = [self.load_layer(load, f"model.layers.{i}.") for i in range(config.num_layers)]
        self.norm = load.tensor("model.norm.weight")
        self.vocab.load_head(load, "lm_head.weight", config.tie_word_embeddings)
        self.cos_sin = config.rope_cos_sin(max_positions).to(backend.device)
        self.scale = config.head_dim**-0.5

    @property
    def embed(self):
        return self.vocab.embed

    @property
    def lm_head(self):
        return self.vocab.lm_head

    # ---- loading -----------------------------------------------------------------------------
    def load_layer(self, load: WeightLoader, p: str) -> DecoderLayer:
        c, sh, d = self.config, self.shard, self.config.head_dim
        q_rows = (sh.q_start * d, sh.num_heads * d)
        kv_rows = (sh.kv_start * d, sh.num_kv_heads * d)
        # per-head q/k norms are [D]; whole-width ones (OLMoE) are sliced like the projections
        q_norm = (p + "self_attn.q_norm.weight", *((0, *q_rows) if c.qk_norm_full else ()))
        k_norm = (p + "self_attn.k_norm.weight", *((0, *kv_rows) if c.qk_norm_full else ()))
        q = load.column(p + "self_attn.q_proj.weight", q_rows)
        k, v = (load.column(p + f"self_attn.{n}_proj.weight", kv_rows) for n in "kv")
        bias = None
        if c.qkv_bias:
            bias = torch.cat([load.tensor(p + "self_attn.q_proj.bias", 0, *q_rows),
                              *(load.tensor(p + f"self_attn.{n}_proj.bias", 0, *kv_rows) for n in "kv")])  # fmt: skip
        return DecoderLayer(
            input_norm=load.tensor(p + "input_layernorm.weight"),
            qkv=load.gemm(q, k, v),
            qkv_bias=bias,
            q_norm=load.tensor(*q_norm) if c.qk_norm else None,
            k_norm=load.tensor(*k_norm) if c.qk_norm else None,
            o_proj=load.row(p + "self_attn.o_proj.weight", q_rows),
            post_norm=load.tensor(p + "post_attention_layernorm.weight"),
            mlp=self.load_mlp(load, p),
        )

    def load_mlp(self, load: WeightLoader, p: str) -> object:
        """The MLP of the layer whose names start with ``p``: merged gate-up (column-parallel)
        and down (row-parallel)."""
        return self.load_dense_mlp(load, p + "mlp.", (self.shard.inter_start, self.shard.intermediate))

    @staticmethod
    def load_dense_mlp(load: WeightLoader, p: str, inter: tuple[int, int]) -> DenseMLP:
        """A SwiGLU MLP ``p{gate,up,down}_proj.weight`` with intermediate rows ``inter`` (start,
        size) on this rank."""
        gate, up = (load.column(p + f"{n}_proj.weight", inter) for n in ("gate", "up"))
        return DenseMLP(load.gemm(gate, up), load.row(p + "down_proj.weight", inter))

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

    # ---- forward -----------------------------------------------------------------------------
    def project_qkv(self, layer: DecoderLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[T, Hq, D]``, k and v ``[T, Hkv, D]`` of this rank's heads, q/k normed per head."""
        be, c, sh = self.backend, self.config, self.shard
        t, hq, hkv, d = x.shape[0], sh.num_heads, sh.num_kv_heads, c.head_dim
        qkv = be.linear(x, layer.qkv, layer.qkv_bias)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.reshape(t, hq, d), k.reshape(t, hkv, d), v.reshape(t, hkv, d)
        if layer.q_norm is not None:
            q = be.rms_norm(q, layer.q_norm, c.rms_norm_eps)[0]
            k = be.rms_norm(k, layer.k_norm, c.rms_norm_eps)[0]
        return q, k, v

    def attention(self, layer: DecoderLayer, x: torch.Tensor, meta: AttnMetadata, kv_cache) -> torch.Tensor:
        """QKV, q/k norm, RoPE, the KV store, Meta-Attention and O for the step's ``T`` rows of ``x``."""
        be = self.backend
        q, k, v = self.project_qkv(layer, x)
        q, k = be.rope(q, k, meta.positions, self.cos_sin)
        be.store_kv(k, v, *kv_cache, meta.slot_mapping)
        o = be.attention(q, *kv_cache, meta, self.scale)
        return be.linear(o.reshape(q.shape[0], -1), layer.o_proj)

    def mlp(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        return self.dense_mlp(layer.mlp, x)

    def dense_mlp(self, mlp: DenseMLP, x: torch.Tensor) -> torch.Tensor:
        be = self.backend
        return be.linear(be.silu_and_mul(be.linear(x, mlp.gate_up)), mlp.down)

    def forward(
        self, input_ids: torch.Tensor, meta: AttnMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Hidden states ``[T, H]`` (after the final norm) for the step's ``T`` tokens."""
        be, eps, group = self.backend, self.config.rms_norm_eps, self.group
        h = self.vocab(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = be.rms_norm(h, layer.input_norm, eps, residual)
            if residual is None:
                # the residual stream is kept in fp32 whatever the activation dtype: 30 bf16
                # adds lose enough precision to flip near-tied greedy choices of small models
                residual = h.float()
            h = self.attention(layer, x, meta, kv_cache)
            if group is not None:
                group.all_reduce(h)
            x, residual = be.rms_norm(h, layer.post_norm, eps, residual)
            h = self.mlp(layer, x)
            if group is not None:
                group.all_reduce(h)
        return be.rms_norm(h, self.norm, eps, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """fp32 logits ``[N, V]`` for the selected hidden rows (under tensor parallelism: gathered
        on rank 0, ``None`` on the other ranks)."""
        return self.vocab.logits(hidden)
