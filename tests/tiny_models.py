"""Tiny random Llama / Qwen2 / Qwen3 checkpoints built in-process with HF ``save_pretrained`` (no
hub access), and the HF greedy oracle. Imported by tests as ``tiny_models`` (a plain module, so
it does not clash with ``tests/kernels/conftest.py``)."""

from __future__ import annotations

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
