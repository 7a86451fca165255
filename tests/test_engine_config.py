"""The engine core: ``EngineConfig`` (checked once, errors name the field, picklable), the engine
built from it alone (also in another process), the runner's KV sizing, the proposer interface,
and serving code that never imports the tooling."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import random_prompts

from portable_xy import LLM, EngineConfig, SamplingParams
from portable_xy.engine.llm_engine import LLMEngine
from portable_xy.engine.model_runner import kv_bytes_per_block
from portable_xy.engine.scheduler import Draft
from portable_xy.spec_decode import Proposer

GREEDY = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_unknown_keyword_is_a_type_error_naming_it(tiny_llama):
    with pytest.raises(TypeError, match=r"LLM got unknown argument\(s\) \['max_num_seq'\]"):
        LLM(tiny_llama, backend="cpu", max_num_seq=4)
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['tensor_parallel'\]"):
        EngineConfig.from_kwargs(model=tiny_llama, tensor_parallel=2)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"gpu_memory_utilization": 0.0}, ValueError, r"gpu_memory_utilization must be in \(0, 1\], got 0.0"),
        ({"kv_cache_memory_gb": -1}, ValueError, r"kv_cache_memory_gb must be None or a positive number, got -1"),
        ({"enforce_eager": "yes"}, TypeError, r"enforce_eager must be None, True or False, got 'yes'"),
        ({"enable_prefix_caching": 1}, TypeError, r"enable_prefix_caching must be True or False, got 1"),
        ({"block_size": 24}, ValueError, r"block_size must be a multiple of 16, got 24"),
        ({"num_kv_blocks": 0}, ValueError, r"num_kv_blocks must be None or a positive int, got 0"),
        ({"tensor_parallel_size": 3}, ValueError, r"tensor_parallel_size=3 does not divide .*num_attention_heads=4"),
        ({"tensor_parallel_size": 0}, ValueError, r"tensor_parallel_size must be a positive int"),
        ({"quantization": "awq"}, ValueError, r"quantization='awq' is not supported"),
        ({"scheduler_policy": "lifo"}, ValueError, r"scheduler policy 'lifo' is not one of"),
        ({"seed": 1.5}, TypeError, r"seed must be an int, got 1.5"),
        ({"speculative_config": {"method": "ngram"}}, ValueError, r"num_speculative_tokens"),
    ],
)
def test_bad_settings_name_the_field(tiny_llama, kwargs, error, match):
    with pytest.raises(error, match=match):
        EngineConfig(tiny_llama, backend="cpu", **kwargs)


def test_config_resolves_defaults_and_pickles(tiny_llama):
    cfg = EngineConfig(tiny_llama, backend="cpu", dtype="float32")
    assert cfg.backend == "cpu" and cfg.dtype == torch.float32
    assert cfg.max_model_len == cfg.model_config.max_position_embeddings == 1024
    assert cfg.block_size == 16 and cfg.speculative_config is None
    assert cfg.model_path.is_dir() and cfg.model_config.architecture == "LlamaForCausalLM"
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg
    spec = EngineConfig(tiny_llama, backend="cpu", speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert spec.scheduler_config.num_speculative_tokens == 3
    assert pickle.loads(pickle.dumps(spec)).speculative_config == spec.speculative_config


def test_engine_rebuilt_from_a_pickled_config_in_another_process(tiny_llama, tmp_path):
    """A worker process rebuilds the same engine from the pickled config: same greedy tokens."""
    cfg = EngineConfig(tiny_llama, backend="cpu", dtype="float32", max_model_len=256, skip_tokenizer_init=True)
    prompts = random_prompts(3, [5, 40, 17], seed=21)
    here = LLMEngine.from_config(cfg)
    for i, p in enumerate(prompts):
        here.add_request(str(i), None, p, GREEDY)
    done = []
    while here.has_unfinished_requests():
        done += here.step()
    want = [o.outputs[0].token_ids for o in sorted(done, key=lambda o: int(o.request_id))]
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    code = textwrap.dedent(f"""
        import json, pickle, sys
        from portable_xy import SamplingParams
        from portable_xy.engine.llm_engine import LLMEngine
        cfg = pickle.loads(open({str(tmp_path / "cfg.pkl")!r}, "rb").read())
        eng = LLMEngine.from_config(cfg)
        prompts = {prompts!r}
        for i, p in enumerate(prompts):
            eng.add_request(str(i), None, p, SamplingParams(temperature=0, max_tokens=12, min_tokens=12))
        done = []
        while eng.has_unfinished_requests():
            done += eng.step()
        print("TOKENS", json.dumps([o.outputs[0].token_ids for o in sorted(done, key=lambda o: int(o.request_id))]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("TOKENS ")), None)
    assert line is not None, out.stdout + out.stderr
    assert json.loads(line[len("TOKENS ") :]) == want


def test_runner_sizes_its_kv_cache(tiny_llama, monkeypatch):
    """The runner sizes the cache: kv_cache_memory_gb on CPU, and on a device that reports its
    memory (as CUDA and NPU backends do) gpu_memory_utilization of it minus what is in use."""
    from portable_xy.backends.cpu import CpuBackend

    llm = LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=128, kv_cache_memory_gb=0.01)
    per_block = kv_bytes_per_block(llm.model_config, 16, torch.float32)
    assert llm.engine.runner.num_kv_blocks == int(0.01 * 2**30 // per_block) == llm.engine.bm.num_free_blocks
    assert llm.engine.runner.kv_caches[0][0].shape[0] == llm.engine.runner.num_kv_blocks
    free, total = 300 * per_block, 400 * per_block
    monkeypatch.setattr(CpuBackend, "mem_get_info", lambda self: (free, total))
    dev = LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=128, gpu_memory_utilization=0.9)
    assert dev.engine.runner.num_kv_blocks == int(free - 0.1 * total) // per_block == 260


class _ScriptedProposer(Proposer):
    """Proposes ``script[seq index]`` continuations (the reference output, or garbage)."""

    def __init__(self, script: dict[str, list[int]], prompt_lens: dict[str, int]) -> None:
        self.script, self.prompt_lens, self.calls = script, prompt_lens, 0

    drafts_ahead = True

    def propose(self, seqs, out):
        self.calls += 1
        drafts = {}
        for seq, k in seqs:
            done = seq.num_tokens - self.prompt_lens[seq.request_id]
            drafts[seq.seq_id] = Draft(self.script[seq.request_id][done : done + k])
        return drafts


@pytest.mark.parametrize("oracle", [True, False])
def test_any_proposer_plugs_into_the_engine(tiny_llama, oracle):
    """A proposer is anything with ``propose(seqs, out)`` / ``copy_blocks``: drafts equal to
    the reference output are all accepted, garbage drafts none; the output is the same."""
    prompts = random_prompts(2, [9, 30], seed=8)
    ref = LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = _ids(ref.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    llm = LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=256, speculative_config=spec)
    script = {str(i): (w if oracle else [(t + 1) % 100 + 3 for t in w]) for i, w in enumerate(want)}
    llm.engine.proposer = _ScriptedProposer(script, {str(i): len(p) for i, p in enumerate(prompts)})
    assert _ids(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)) == want
    stats = llm.get_metrics()
    assert llm.engine.proposer.calls > 0 and stats["spec_draft_tokens"] > 0
    assert stats["spec_acceptance_rate"] == (1.0 if oracle else 0.0)


def test_serving_never_imports_the_tooling(tiny_llama):
    """``LLM(...).generate`` and ``portable-xy generate`` leave no ``portable_xy.tools`` module loaded."""
    code = textwrap.dedent(f"""
        import sys
        from portable_xy import LLM, SamplingParams
        from portable_xy.cli import main
        llm = LLM({tiny_llama!r}, backend="cpu", max_model_len=64)
        llm.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
        main(["generate", "--model", {tiny_llama!r}, "--backend", "cpu", "--max-tokens", "2", "--prompt", "hi"])
        print("TOOLS", sorted(m for m in sys.modules if m.startswith("portable_xy.tools")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "TOOLS []" in out.stdout, out.stdout + out.stderr
