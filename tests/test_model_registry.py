"""The model registry: HF and GGUF architecture names resolve through it, the family's adapter
sets its own config fields and refuses what it cannot run, and a model class registered from
outside the package is the one the engine builds and runs."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import hf_greedy, random_prompts

from portable_xy import LLM, SamplingParams
from portable_xy.models.config import ModelConfig
from portable_xy.models.llama import LlamaForCausalLM, llama_config
from portable_xy.models.registry import (
    MODELS,
    ModelEntry,
    UnsupportedModelError,
    entry_for,
    entry_for_gguf,
    gguf_architectures,
    register_model,
)


def test_llama_family_entries():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= set(MODELS)
    assert gguf_architectures() == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                    "qwen3": "Qwen3ForCausalLM", "llama+moe": "MixtralForCausalLM",
                                    "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
                                    "olmoe": "OlmoeForCausalLM"}  # fmt: skip
    assert entry_for_gguf("llama").architecture == "LlamaForCausalLM"
    assert entry_for_gguf("llama", moe=True).architecture == "MixtralForCausalLM"  # a llama GGUF with experts
    assert entry_for_gguf("qwen3moe", moe=True).architecture == "Qwen3MoeForCausalLM"
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        assert MODELS[name].model_class() is LlamaForCausalLM
    assert entry_for(["Foo", "Qwen2ForCausalLM"]).architecture == "Qwen2ForCausalLM"
    with pytest.raises(UnsupportedModelError, match="supported: .*Qwen3ForCausalLM"):
        entry_for(["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gpt2'.*qwen3"):
        entry_for_gguf("gpt2")


@pytest.mark.parametrize(
    "arch,extra,want",
    [
        ("LlamaForCausalLM", {}, (False, False)),
        ("LlamaForCausalLM", {"attention_bias": True}, (True, False)),
        ("MistralForCausalLM", {"attention_bias": True}, (True, False)),
        ("Qwen2ForCausalLM", {}, (True, False)),
        ("Qwen3ForCausalLM", {}, (False, True)),
    ],
)
def test_family_adapter_fields(arch, extra, want):
    cfg = dict(architectures=[arch], vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
               num_attention_heads=4, **extra)  # fmt: skip
    c = ModelConfig.from_hf(cfg)
    assert (c.architecture, c.qkv_bias, c.qk_norm) == (arch, *want)
    with pytest.raises(UnsupportedModelError, match="mlp_bias"):
        ModelConfig.from_hf(dict(cfg, mlp_bias=True))


class CountingLlama(LlamaForCausalLM):
    """An out-of-tree family: the Llama decoder with its forward passes counted."""

    calls = 0

    def forward(self, input_ids, meta, kv_caches):
        type(self).calls += 1
        return super().forward(input_ids, meta, kv_caches)


@pytest.fixture
def plugged(tiny_llama, tmp_path):
    """A copy of the tiny Llama checkpoint whose config names an architecture registered here."""
    d = tmp_path / "plugged"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["CountingLlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    register_model(ModelEntry("CountingLlamaForCausalLM", CountingLlama, llama_config))
    yield str(d)
    del MODELS["CountingLlamaForCausalLM"]


def test_registered_model_runs_in_the_engine(plugged, tiny_llama):
    prompts = random_prompts(2, [9, 14])
    llm = LLM(plugged, backend="cpu", dtype="float32", max_model_len=256, skip_tokenizer_init=True)
    assert type(llm.engine.runner.model) is CountingLlama
    greedy = SamplingParams(temperature=0, max_tokens=6, min_tokens=6)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
    assert CountingLlama.calls > 0
    assert [list(o.outputs[0].token_ids) for o in outs] == hf_greedy(tiny_llama, prompts, 6)
