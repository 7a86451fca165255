"""End to end through the Triton kernels: `backend="interpret"` (every op a Triton kernel run by the
interpreter on CPU tensors) is token-identical to `backend="cpu"` under greedy decoding, on a batch
that mixes a chunked long prompt, short prompts and running decodes."""

import pytest
import torch
from tiny_models import TINY, _perturb

from portable_xy import LLM, SamplingParams

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def small_vocab_llama(tmp_path_factory):
    """A tiny Llama with a 512-token vocabulary (the interpreter is slow; no tokenizer needed)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**dict(TINY, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _perturb(model, seed=3)
    out = tmp_path_factory.mktemp("tiny-llama-v512")
    model.save_pretrained(out)
    return str(out)


def test_interpret_backend_matches_cpu_on_mixed_batch(small_vocab_llama):
    g = torch.Generator().manual_seed(2)
    long_prompt = torch.randint(3, 512, (70,), generator=g).tolist()
    shorts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 5, 12)]
    prompts = [{"prompt_token_ids": p} for p in [*shorts, long_prompt]]
    params = SamplingParams(temperature=0, max_tokens=6, min_tokens=6)
    outs = {}
    for backend in ("cpu", "interpret"):
        # budget 32: the long prompt is chunked over several steps while the short ones decode
        llm = LLM(
            small_vocab_llama, backend=backend, dtype="float32", max_model_len=128,
            max_num_batched_tokens=32, skip_tokenizer_init=True, num_kv_blocks=64,
        )  # fmt: skip
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["interpret"] == outs["cpu"]


@pytest.fixture(scope="module")
def small_vocab_qwen2_moe(tmp_path_factory):
    """A tiny Qwen2-MoE (8 experts, top-2, a shared expert) with a 512-token vocabulary."""
    from tiny_models import ROUTER_SCALE, TINY_MOE, TINY_MOE_VARIANTS, _is_router
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    spec = {**TINY_MOE, **TINY_MOE_VARIANTS["qwen2_moe"], "vocab_size": 512, "max_position_embeddings": 256}
    spec.pop("arch")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2MoeConfig(**spec), dtype=torch.float32)
    _perturb(model, seed=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _is_router(name):
                p.mul_(ROUTER_SCALE)
    out = tmp_path_factory.mktemp("tiny-qwen2-moe-v512")
    model.save_pretrained(out)
    return str(out)


def test_interpret_backend_runs_moe_like_cpu(small_vocab_qwen2_moe):
    """The fused-MoE meta-kernel (routing, grouped GEMMs, combine) inside the engine: the same
    greedy tokens as the CPU backend's grouped path on a mixed prefill / decode batch."""
    g = torch.Generator().manual_seed(3)
    prompts = [{"prompt_token_ids": torch.randint(3, 512, (n,), generator=g).tolist()} for n in (1, 9, 40)]
    params = SamplingParams(temperature=0, max_tokens=4, min_tokens=4)
    outs = {}
    for backend in ("cpu", "interpret"):
        llm = LLM(
            small_vocab_qwen2_moe, backend=backend, dtype="float32", max_model_len=128,
            max_num_batched_tokens=32, skip_tokenizer_init=True, num_kv_blocks=64,
        )  # fmt: skip
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        w13 = llm.engine.runner.model.layers[0].mlp.w13
        assert (backend == "interpret") == (isinstance(w13, torch.Tensor) and w13.dim() == 3)  # stacked: the kernel
    assert outs["interpret"] == outs["cpu"]
