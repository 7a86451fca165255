"""Stage 3, end to end on the device: random-weight tiny Llama (llama3 RoPE scaling, untied
embeddings), Qwen2 (q/k/v bias, tied embeddings, GQA 4) and Qwen3 (q/k RMSNorm), plus one
Llama-shaped ~1B model on a GPU / NPU, built in-process with HF ``save_pretrained`` (no hub, no
GGUF).

* Greedy tokens against HF transformers on the same device, fp32 and bf16 (fp16 under the
  interpreter). A mismatch is accepted only at a near tie, where HF's log-probabilities of the two
  tokens differ by less than :data:`NEAR_TIE` for the dtype; that sequence is compared no further.
* Batch invariance: each prompt alone gives the tokens it gets in a batch.
* Prefix caching: a second pass over the same prompts hits the cache and gives the same tokens.
* n-gram speculation is lossless: the same tokens as without it.
* Decode graphs (CUDA / NPU): captured and replayed, the same tokens as eager.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .report import Stage

NEAR_TIE = {torch.float32: 1e-3, torch.float16: 0.3, torch.bfloat16: 0.3}
NEW_TOKENS = {"cpu": 6}  # tokens generated per prompt by device type (the interpreter is slow); default 12
TINY = dict(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)  # fmt: skip
VARIANTS = {
    "llama": dict(arch="LlamaConfig", tie_word_embeddings=False, rope_theta=10000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}),
    "qwen2": dict(arch="Qwen2Config", tie_word_embeddings=True, num_key_value_heads=1, rope_theta=1e6),
    "qwen3": dict(arch="Qwen3Config", tie_word_embeddings=False, num_key_value_heads=4, rope_theta=1e6),
    "llama-1b": dict(arch="LlamaConfig", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                     rope_theta=500000.0, max_position_embeddings=4096),
}  # fmt: skip


def build_model(variant: str, out: Path, vocab: int, seed: int = 0) -> Path:
    """A random-weight checkpoint of ``variant`` in ``out`` (norms near 1, every weight random)."""
    import transformers

    spec = dict(TINY, vocab_size=vocab, **VARIANTS[variant])
    config = getattr(transformers, spec.pop("arch"))(**spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    std = 0.05 if variant != "llama-1b" else 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else std * noise)
    model.save_pretrained(out)
    return out


def prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    """``n`` prompts of odd lengths; the later ones repeat a phrase, so n-gram drafts get accepted."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, length in enumerate([5, 19, 40, 77, 3, 33][:n]):
        p = torch.randint(3, vocab, (length,), generator=g).tolist()
        if i % 2:
            p = (p[:8] * 8)[:length] + p[:4]
        out.append(p)
    return out


def new_tokens(device: torch.device) -> int:
    return NEW_TOKENS.get(device.type, 12)


def hf_greedy(path: Path, dtype: torch.dtype, device: torch.device, ps: list[list[int]]):
    """HF's greedy tokens and per-step log-probabilities for each prompt, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    res = []
    with torch.inference_mode():
        for p in ps:
            ids = torch.tensor([p], device=device)
            n = new_tokens(device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, output_scores=True,
                                 return_dict_in_generate=True)  # fmt: skip
            res.append((gen.sequences[0, len(p) :].tolist(), [torch.log_softmax(s[0].float(), -1).cpu()
                                                              for s in gen.scores]))  # fmt: skip
    del model
    return res


def compare(ours: list[int], theirs: list[int], logprobs: list[torch.Tensor], tie: float) -> tuple[int, str]:
    """(tokens compared, note); raises on a mismatch that is not a near tie."""
    for t, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            gap = float(logprobs[t][b] - logprobs[t][a])
            if gap >= tie:
                raise AssertionError(f"token {t}: ours {a}, HF {b}, HF log-prob gap {gap:.3g} >= near-tie {tie}")
            return t, f"near tie at token {t} (gap {gap:.2g})"
    if len(ours) != len(theirs):
        raise AssertionError(f"{len(ours)} tokens, HF {len(theirs)}")
    return len(ours), ""


def check_model(stage: Stage, be, path: Path, variant: str, dtype: torch.dtype, ps: list[list[int]]) -> None:
    """Every check of one model in one dtype."""
    from ... import LLM, SamplingParams

    dev = be.device
    dt = str(dtype).removeprefix("torch.")
    name = f"{variant} {dt}"
    params = SamplingParams(temperature=0, max_tokens=new_tokens(dev), min_tokens=new_tokens(dev))
    kw: dict[str, Any] = dict(backend=be.name, dtype=dt, max_model_len=256, max_num_batched_tokens=64,
                              skip_tokenizer_init=True, num_kv_blocks=128)  # fmt: skip
    reqs = [{"prompt_token_ids": p} for p in ps]

    def tokens(llm, rs=reqs) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(rs, params, use_tqdm=False)]

    hf = stage.run(f"{name}: HF greedy on {dev.type}", lambda: {"r": hf_greedy(path, dtype, dev, ps)})
    llm = LLM(str(path), enable_prefix_caching=True, **kw)
    batched = tokens(llm)

    def vs_hf() -> dict[str, Any]:
        compared, notes = 0, []
        for i, (ours, (theirs, lps)) in enumerate(zip(batched, hf["r"])):
            n, note = compare(ours, theirs, lps, NEAR_TIE[dtype])
            compared += n
            notes += [f"prompt {i}: {note}"] if note else []
        return {"tokens_compared": compared, "near_ties": notes}

    def invariant() -> dict[str, Any]:
        for i, r in enumerate(reqs):
            alone = tokens(llm, [r])[0]
            assert alone == batched[i], f"prompt {i}: alone {alone} vs in a batch {batched[i]}"
        return {}

    def prefix() -> dict[str, Any]:
        outs = llm.generate(reqs, params, use_tqdm=False)
        cached = sum(o.num_cached_tokens or 0 for o in outs)
        assert cached > 0, "no prompt token came from the prefix cache"
        again = [o.outputs[0].token_ids for o in outs]
        assert again == batched, f"with cached prefixes {again} vs {batched}"
        return {"cached_tokens": cached}

    def ngram() -> dict[str, Any]:
        spec = LLM(str(path), speculative_config={"method": "ngram", "num_speculative_tokens": 3}, **kw)
        got = tokens(spec)
        assert got == batched, f"with n-gram drafts {got} vs {batched}"
        return {k: v for k, v in spec.get_metrics().items() if "draft" in k or "accept" in k}

    def graphs() -> dict[str, Any]:
        eager = tokens(LLM(str(path), enforce_eager=True, **kw))
        graphed = LLM(str(path), enforce_eager=False, **kw)
        assert graphed.engine.runner.graphs is not None, "no decode graphs were set up"
        got = tokens(graphed)
        assert got == eager, f"graphs {got} vs eager {eager}"
        return {}

    if hf is not None:
        stage.run(f"{name}: greedy tokens vs HF", vs_hf)
    stage.run(f"{name}: batch invariance", invariant)
    stage.run(f"{name}: prefix caching", prefix)
    if dtype == torch.float32 and variant != "llama-1b":
        stage.run(f"{name}: n-gram speculation lossless", ngram)
    if dev.type == "cpu":
        stage.skip(f"{name}: decode graphs", "no decode graphs under the interpreter")
    else:
        stage.run(f"{name}: decode graphs replay = eager", graphs)


def run(stage: Stage, be, quick: bool, work: Path) -> Path | None:
    """The checks; returns the largest model built (for the speed stage)."""
    interp = be.device.type == "cpu"
    vocab = 512 if interp else 32000
    low = torch.float16 if interp else torch.bfloat16
    variants = ["llama", "qwen2", "qwen3"] + ([] if interp else ["llama-1b"])
    built = None
    for vi, variant in enumerate(variants):
        path = stage.run(f"{variant}: build a random-weight checkpoint", build_model, variant, work / variant, vocab,
                         vi)  # fmt: skip
        if path is None:
            continue
        built = path
        ps = prompts(vocab, 3 if interp else (4 if quick else 6), seed=vi)
        for dtype in (torch.float32, low):
            if be.supports_dtype(dtype):
                check_model(stage, be, path, variant, dtype, ps)
            else:
                stage.skip(f"{variant} {dtype}", f"the {be.name} backend has no {dtype}")
    return built
