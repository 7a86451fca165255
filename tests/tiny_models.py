"""Tiny random Llama / Qwen2 / Qwen3 checkpoints built in-process with HF ``save_pretrained`` (no
hub access), and the HF greedy oracle. Imported by tests as ``tiny_models`` (a plain module, so
it does not clash with ``tests/kernels/conftest.py``)."""

from __future__ import annotations

import numpy as np
import torch

TINY = dict(
    vocab_size=49152,
    hidden_size=128,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)
TINY_VARIANTS = {
    # Llama with llama3-style RoPE scaling and untied embeddings
    "llama": dict(
        arch="LlamaConfig",
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    # Qwen2: q/k/v bias, tied embeddings, GQA ratio 4
    "qwen2": dict(arch="Qwen2Config", tie_word_embeddings=True, num_key_value_heads=1, rope_theta=1e6),
    # Qwen3: per-head q/k RMSNorm, no GQA
    "qwen3": dict(arch="Qwen3Config", tie_word_embeddings=False, num_key_value_heads=4, rope_theta=1e6),
}


# Tiny random mixture-of-experts models: 8 experts, top-2, one variant per family (moe.py)
TINY_MOE = dict(TINY, num_hidden_layers=3, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)
TINY_MOE_VARIANTS = {
    "mixtral": dict(arch="MixtralConfig", num_local_experts=8, num_experts_per_tok=2, intermediate_size=96),
    # shared expert with its sigmoid gate, q/k/v bias, routing weights not renormalised
    "qwen2_moe": dict(arch="Qwen2MoeConfig", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=96, norm_topk_prob=False),
    # per-head q/k norm, renormalised top-k, layer 0 dense (mlp_only_layers)
    "qwen3_moe": dict(arch="Qwen3MoeConfig", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      norm_topk_prob=True, mlp_only_layers=[0]),
    # whole-width q/k norm and clip_qkv
    "olmoe": dict(arch="OlmoeConfig", num_experts=8, num_experts_per_tok=2, intermediate_size=64, clip_qkv=1.5,
                  rms_norm_eps=1e-5),
}  # fmt: skip
ROUTER_SCALE = 6.0  # router weights this many times the others': skewed, not degenerate, routing


def _is_router(name: str) -> bool:
    return name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight"))


def make_tiny_moe(variant: str, out_dir, tokenizer_dir, **overrides) -> str:
    """A tiny random MoE checkpoint of ``variant`` (:data:`TINY_MOE_VARIANTS`), saved by HF."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = {**TINY_MOE, **TINY_MOE_VARIANTS[variant], **overrides}
    config = getattr(transformers, spec.pop("arch"))(**spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model, seed=10 + list(TINY_MOE_VARIANTS).index(variant))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _is_router(name):
                p.mul_(ROUTER_SCALE)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return str(out_dir)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """HF inits norms to 1 and biases to 0; randomise everything so every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise)


def make_tiny_model(variant: str, out_dir, tokenizer_dir) -> str:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = dict(TINY, **TINY_VARIANTS[variant])
    cfg_cls = getattr(transformers, spec.pop("arch"))
    config = cfg_cls(**spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model, seed=list(TINY_VARIANTS).index(variant))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return str(out_dir)


def hf_greedy(model_dir: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """HF transformers greedy continuation of each prompt, one prompt at a time (the oracle).
    ``min_new_tokens`` masks EOS exactly as the engine's ``min_tokens`` does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            outs.append(gen[0, len(p) :].tolist())
    return outs


def random_prompts(n: int, lengths: list[int], vocab: int = 49152, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


# GGUF tensor types of make_tiny_gguf's weights, by llama.cpp tensor name (per layer: blk.N.<name>)
TINY_GGUF_TYPES = {
    "token_embd.weight": "Q8_0",
    "attn_q.weight": "Q4_0",
    "attn_k.weight": "Q4_0",
    "attn_v.weight": "Q4_0",
    "attn_output.weight": "Q8_0",
    "ffn_gate.weight": "Q4_1",
    "ffn_up.weight": "Q4_1",
    "ffn_down.weight": "Q4_1",
}


def make_tiny_gguf(path, types: dict[str, str] | None = None, layers: int = 2, seed: int = 0) -> str:
    """A random Llama GGUF (no tokenizer: use ``skip_tokenizer_init=True``): hidden 64, 4 heads of
    16 (2 KV heads), MLP 96 (3 quantization blocks), vocabulary 256, tied embeddings; weights in
    ``types`` (default :data:`TINY_GGUF_TYPES`; ``F16`` / ``F32`` allowed), norms in F32."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    types = {**TINY_GGUF_TYPES, **(types or {})}
    g = np.random.default_rng(seed)
    hidden, inter, vocab, heads, kv, hd = 64, 96, 256, 4, 2, 16
    w = GGUFWriter(str(path), "llama")
    for key, val in [("block_count", layers), ("embedding_length", hidden), ("feed_forward_length", inter),
                     ("attention.head_count", heads), ("attention.head_count_kv", kv), ("vocab_size", vocab),
                     ("context_length", 512)]:  # fmt: skip
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)

    def tensor(name: str, shape: tuple[int, int], kind: str, scale: float) -> None:
        x = (g.standard_normal(shape) * scale).astype(np.float32)
        if kind in ("F32", "F16"):
            w.add_tensor(name, x.astype(np.float32 if kind == "F32" else np.float16))
        else:
            qt = getattr(GGMLQuantizationType, kind)
            w.add_tensor(name, quantize(x, qt), raw_dtype=qt)

    tensor("token_embd.weight", (vocab, hidden), types["token_embd.weight"], 1.0)
    w.add_tensor("output_norm.weight", (1 + 0.1 * g.standard_normal(hidden)).astype(np.float32))
    shapes = {"attn_q.weight": (heads * hd, hidden), "attn_k.weight": (kv * hd, hidden),
              "attn_v.weight": (kv * hd, hidden), "attn_output.weight": (hidden, heads * hd),
              "ffn_gate.weight": (inter, hidden), "ffn_up.weight": (inter, hidden),
              "ffn_down.weight": (hidden, inter)}  # fmt: skip
    for i in range(layers):
        for norm in ("attn_norm.weight", "ffn_norm.weight"):
            w.add_tensor(f"blk.{i}.{norm}", (1 + 0.1 * g.standard_normal(hidden)).astype(np.float32))
        for name, shape in shapes.items():
            kind = types.get(f"blk.{i}.{name}", types[name])
            tensor(f"blk.{i}.{name}", shape, kind, shape[1] ** -0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
