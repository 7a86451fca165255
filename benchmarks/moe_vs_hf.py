"""A random ~1B-parameter mixture-of-experts model (Mixtral layout: 16 experts, top-2, hidden 1024)
on portable_xy against HF transformers fp32, side by side in one run.

    python benchmarks/moe_vs_hf.py [--dir DIR] [--experts 16] [--top-k 2] [--hidden 1024]
        [--layers 16] [--intermediate 1024] [THROUGHPUT_VS_HF_ARGS ...]

The checkpoint is written once to ``--dir`` (random weights from HF's initialiser, bf16
safetensors, the default model's tokenizer), then ``benchmarks/throughput_vs_hf.py --model DIR``
runs with the remaining arguments (e.g. ``--dtypes bfloat16 float32 --new-tokens 64 --rounds 2``):
one request and ``--batch`` requests, every engine in its own worker, ratios within a round.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def make_checkpoint(out: Path, experts: int, top_k: int, hidden: int, layers: int, inter: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from portable_xy.models.loader import load_tokenizer, resolve_model_path

    heads = hidden // 64
    config = MixtralConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), num_local_experts=experts,
        num_experts_per_tok=top_k, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    print(f"random Mixtral-layout model: {n / 1e9:.2f}B parameters -> {out}")
    model.save_pretrained(out)
    load_tokenizer(resolve_model_path(None)).save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/portable_xy-moe-1b"))
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=1024)
    args, rest = ap.parse_known_args()
    if not (args.dir / "config.json").exists():
        make_checkpoint(args.dir, args.experts, args.top_k, args.hidden, args.layers, args.intermediate)
    script = Path(__file__).with_name("throughput_vs_hf.py")
    sys.exit(subprocess.call([sys.executable, str(script), "--model", str(args.dir), *rest]))


if __name__ == "__main__":
    main()
