"""The engine on quantized GGUF weights (``quantization=``): what stays quantized, what is
dequantized (and said so), and outputs against the dequantized engine."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_gguf, random_prompts

from portable_xy import LLM, SamplingParams
from portable_xy.backends import cpu_native
from portable_xy.backends.cpu import _QuantCpuWeight
from portable_xy.backends.quant import QuantWeight
from portable_xy.config import EngineConfig

pytestmark = pytest.mark.skipif(cpu_native.load() is None, reason="the quantized GEMMs need the C kernels")
ENGINE = dict(skip_tokenizer_init=True, backend="cpu", max_model_len=256, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", {"blk.1.ffn_down.weight": "F16"})


def test_auto_keeps_gguf_blocks_for_bf16_and_dequantizes_for_fp32(tiny_gguf, tiny_llama):
    assert EngineConfig(model=tiny_gguf, dtype="bfloat16", **ENGINE).quantization == "gguf"
    assert EngineConfig(model=tiny_gguf, dtype="float32", **ENGINE).quantization is None
    assert EngineConfig(model=tiny_llama, dtype="bfloat16", **ENGINE).quantization is None  # safetensors
    with pytest.raises(ValueError, match=r"quantization='gguf' needs a \.gguf model"):
        EngineConfig(model=tiny_llama, quantization="gguf", **ENGINE)
    with pytest.raises(ValueError, match=r"quantization='awq' is not supported"):
        EngineConfig(model=tiny_gguf, quantization="awq", **ENGINE)


@pytest.mark.parametrize("quantization", ["gguf", "gguf_a16"])
def test_gemm_weights_and_the_tied_head_stay_quantized_others_are_named(tiny_gguf, quantization, capfd):
    llm = LLM(tiny_gguf, dtype="bfloat16", quantization=quantization, **ENGINE)
    model = llm.engine.runner.model
    err = capfd.readouterr().err
    assert "1 GEMM weight(s) stored as F16 dequantized to bfloat16" in err
    assert "model.layers.1.mlp.down_proj.weight" in err
    assert isinstance(model.embed, QuantWeight) and model.embed.qtype == "q8_0"
    assert isinstance(model.lm_head, _QuantCpuWeight) and model.lm_head.weight.qtype == "q8_0"
    assert model.lm_head.int8 == (quantization == "gguf")
    layer0, layer1 = model.layers
    assert [layer0.qkv.weight.qtype, layer0.o_proj.weight.qtype, layer0.mlp.gate_up.weight.qtype] == [
        "q4_0",
        "q8_0",
        "q4_1",
    ]
    assert isinstance(layer0.mlp.down, _QuantCpuWeight) and not isinstance(layer1.mlp.down, _QuantCpuWeight)
    llm.shutdown()


def _agree_until_near_tie(ours, ref, gap: float) -> int:
    """Tokens compared before the first divergence; a divergence must be a near tie of ``ref``."""
    compared = 0
    for a, b in zip(ours, ref):
        for t, (x, y) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids)):
            if x != y:
                top = b.outputs[0].logprobs[t]
                assert x in top, f"step {t}: token {x} not in the reference's top candidates"
                assert top[y].logprob - top[x].logprob < gap
                break
            compared += 1
    return compared


@pytest.mark.parametrize("quantization,gap", [("gguf_a16", 0.15), ("gguf", 0.6)])
def test_quantized_engine_follows_the_dequantized_engine(tiny_gguf, quantization, gap):
    """Greedy tokens of the quantized engine (batched prefill chunks and decodes) equal those of
    the engine on dequantized fp32 weights up to the first near tie of a sequence."""
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, [5, 40, 17, 90, 3, 33], vocab=256)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    ref = LLM(tiny_gguf, dtype="float32", **ENGINE).generate(prompts, params, use_tqdm=False)
    ours = LLM(tiny_gguf, dtype="bfloat16", quantization=quantization, **ENGINE).generate(
        prompts, params, use_tqdm=False
    )
    assert _agree_until_near_tie(ours, ref, gap) >= 0.5 * len(prompts) * params.max_tokens


def test_smollm2_default_engine_is_quantized_and_greedy_follows_bf16(smollm2_path):
    """The default model with the defaults: Q4_1 layers and the Q8_0 head kept (about 100 MB of
    GEMM weights, against 270 MB in bf16), greedy chat tokens equal to the bf16 engine's up to a
    near tie."""
    chats = [[{"role": "user", "content": c}] for c in ["What is the capital of France?", "Explain a hash table."]]
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, logprobs=2)
    llm = LLM(str(smollm2_path), dtype="bfloat16", max_model_len=512)
    model = llm.engine.runner.model
    gemms = [model.lm_head] + [g for lyr in model.layers for g in (lyr.qkv, lyr.o_proj, lyr.mlp.gate_up, lyr.mlp.down)]
    assert all(isinstance(g, _QuantCpuWeight) for g in gemms)
    assert sum(g.weight.nbytes for g in gemms) < 110e6
    ours = llm.chat(chats, params, use_tqdm=False)
    ref = LLM(str(smollm2_path), dtype="bfloat16", quantization=None, max_model_len=512).chat(
        chats, params, use_tqdm=False
    )
    assert _agree_until_near_tie(ours, ref, 0.6) >= 0.5 * len(chats) * params.max_tokens
    assert torch.isfinite(torch.tensor([o.outputs[0].cumulative_logprob for o in ours])).all()


def test_triton_backend_runs_the_blocks_in_quant_gemm_and_follows_the_dequantized_engine(tiny_gguf, monkeypatch):
    """backend="interpret" (the Triton kernels under the interpreter, fp32): GEMM weights stay
    QuantWeight and go through triton_kernels.quant_gemm; greedy tokens and log-probabilities
    match the same engine on dequantized weights."""
    from portable_xy.triton_kernels import quant_gemm

    calls = []
    real = quant_gemm.quant_linear
    monkeypatch.setattr(quant_gemm, "quant_linear", lambda *a, **k: (calls.append(a[1].qtype), real(*a, **k))[1])
    kw = dict(ENGINE, backend="interpret", dtype="float32", max_num_batched_tokens=32)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, [5, 21, 9], vocab=256)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    ours = LLM(tiny_gguf, quantization="gguf_a16", **kw).generate(prompts, params, use_tqdm=False)
    assert {"q4_0", "q4_1", "q8_0"} <= set(calls)
    ref = LLM(tiny_gguf, quantization=None, **kw).generate(prompts, params, use_tqdm=False)
    assert _agree_until_near_tie(ours, ref, 1e-3) == len(prompts) * params.max_tokens
    for a, b in zip(ours, ref):
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x if t in y)
