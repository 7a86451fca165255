"""Tensor parallelism on gloo (CPU): TP=2 against TP=1 on tiny random Llama / Qwen2 / Qwen3 (fp32),
sharded weight reads, and the fault paths (a worker killed or raising, bad head counts, teardown)."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from portable_xy import LLM, SamplingParams
from portable_xy.distributed import ShardPlan, TensorParallelError, check_tensor_parallel
from portable_xy.models.config import ModelConfig
from portable_xy.models.loader import open_weights

# as in test_smollm2.py: a greedy flip is accepted only where the TP=1 run itself sees a near tie
NEAR_TIE_LOGPROB = 1e-3
ENGINE = dict(backend="cpu", dtype="float32", max_model_len=256)


def children() -> list[int]:
    """Live (non-zombie) child processes of this process, but multiprocessing's resource tracker
    (one per process that used spawn, it lives until this process exits)."""
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == me and fields[0] != "Z":
                cmd = (d / "cmdline").read_bytes()
                if b"resource_tracker" not in cmd:
                    out.append(int(d.name))
    return out


def wait_no_children(timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while children() and time.monotonic() < deadline:
        time.sleep(0.1)
    return children()


def _pid(runner) -> int:
    return os.getpid()


def _raise_on_workers(runner) -> int:
    if runner.group.rank > 0:
        raise RuntimeError("injected worker failure")
    return 0


def _shard_sums(runner) -> list[float]:
    """The sum of this rank's first QKV weight (ranks holding different shards differ)."""
    return float(runner.model.layers[0].qkv.float().sum())


def prompts_mixed() -> list[dict]:
    """Prompts of mixed lengths (a long one is chunked next to others' decodes) sharing a prefix."""
    shared = list(range(100, 160))
    return [{"prompt_token_ids": shared + list(range(200 + 7 * i, 200 + 7 * i + 5 + 9 * i))} for i in range(5)] + [
        {"prompt_token_ids": list(range(300, 303))},
        {"prompt_token_ids": list(range(400, 520))},
    ]


def greedy(llm: LLM, prompts: list[dict], n: int = 24, logprobs: int | None = None):
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs)
    return llm.generate(prompts, sp, use_tqdm=False)


def assert_same_or_near_tie(ref_outs, outs) -> None:
    """TP=2 tokens equal TP=1's, except after a documented near tie of the TP=1 run."""
    for ref, out in zip(ref_outs, outs):
        a, b = ref.outputs[0], out.outputs[0]
        for t, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                lp = a.logprobs[t]
                assert y in lp, f"token {t}: TP=1 {x} vs TP=2 {y}, not among TP=1's top candidates"
                gap = lp[x].logprob - lp[y].logprob
                assert gap < NEAR_TIE_LOGPROB, f"token {t}: TP=1 {x} vs TP=2 {y}, log-prob gap {gap:.2e}"
                break
        else:
            assert len(a.token_ids) == len(b.token_ids)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_tp2_matches_tp1_greedy_mixed_batches_prefix_cache_and_seeded_sampling(tiny_models, variant):
    """A small step budget mixes prefill chunks and decodes in one step; the second greedy pass
    reads the prefix cache; seeded sampling gives the same tokens."""
    kw = dict(ENGINE, max_num_batched_tokens=64)
    ref = LLM(tiny_models[variant], **kw)
    tp = LLM(tiny_models[variant], tensor_parallel_size=2, **kw)
    try:
        sums = tp.collective_rpc(_shard_sums)
        assert len(sums) == 2 and sums[0] != sums[1]  # two different shards
        prompts = prompts_mixed()
        ref_outs = greedy(ref, prompts, logprobs=5)
        assert_same_or_near_tie(ref_outs, greedy(tp, prompts))
        hits = tp.get_metrics()["prefix_cache_hit_tokens"]
        assert_same_or_near_tie(ref_outs, greedy(tp, prompts))
        assert tp.get_metrics()["prefix_cache_hit_tokens"] > hits
        # top-k keeps the sampled set to tokens whose order fp32 rounding cannot swap: a random
        # model's near-uniform tail would let any change of reduction order reorder it
        sp = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True, n=2)
        few = prompts[:2]
        a, b = ref.generate(few, sp, use_tqdm=False), tp.generate(few, sp, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    finally:
        tp.shutdown()
    assert wait_no_children() == []


def test_ngram_speculation_tp2_matches_tp1(tiny_llama):
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    pattern = list(range(600, 612)) * 4  # repeats: the n-gram proposer finds drafts
    prompts = [{"prompt_token_ids": pattern + [5 + i]} for i in range(3)]
    ref = LLM(tiny_llama, speculative_config=spec, **ENGINE)
    tp = LLM(tiny_llama, speculative_config=spec, tensor_parallel_size=2, **ENGINE)
    try:
        ref_outs, outs = greedy(ref, prompts, 32), greedy(tp, prompts, 32)
        assert tp.get_metrics()["spec_draft_tokens"] > 0
        assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref_outs]
    finally:
        tp.shutdown()
    assert wait_no_children() == []


def test_killed_worker_raises_in_parent_and_a_new_engine_works(tiny_llama):
    llm = LLM(tiny_llama, tensor_parallel_size=2, **ENGINE)
    worker = llm.collective_rpc(_pid)[1]
    prompts = [{"prompt_token_ids": list(range(10 + i, 30 + i))} for i in range(8)]
    sp = SamplingParams(temperature=0, max_tokens=220, ignore_eos=True)
    result: dict = {}

    def run() -> None:
        try:
            llm.generate(prompts, sp, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e
            result["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)
    killed_at = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive(), "generate hung after its worker was killed"
    err = result.get("error")
    assert err is not None, "generate finished although its worker was killed"
    assert result["at"] - killed_at < 10
    assert "rank 1" in str(err) and "SIGKILL" in str(err), str(err)
    assert wait_no_children() == []
    with pytest.raises(Exception, match="tensor-parallel group stopped"):  # the old engine stays stopped
        llm.generate(prompts[:1], sp, use_tqdm=False)
    assert llm.engine.bm.num_free_blocks == len(llm.engine.bm.blocks)  # failed requests freed their blocks
    llm.shutdown()
    again = LLM(tiny_llama, tensor_parallel_size=2, **ENGINE)  # a second group in the same process
    try:
        ref = LLM(tiny_llama, **ENGINE)
        assert_same_or_near_tie(greedy(ref, prompts[:2], logprobs=5), greedy(again, prompts[:2]))
    finally:
        again.shutdown()
    assert wait_no_children() == []


def test_worker_exception_names_rank_and_traceback(tiny_llama):
    llm = LLM(tiny_llama, tensor_parallel_size=2, **ENGINE)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        llm.collective_rpc(lambda runner: 0)  # does not pickle: refused before anything is sent
    assert len(set(llm.collective_rpc(_pid))) == 2  # the group still works
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 1") as info:
        llm.collective_rpc(_raise_on_workers)
    assert time.monotonic() - t0 < 10
    assert "injected worker failure" in str(info.value) and "_raise_on_workers" in str(info.value)
    assert wait_no_children() == []
    llm.shutdown()  # after a failure: nothing left to stop, no error


def test_unsupported_head_counts_fail_before_any_process(tiny_llama):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .*num_attention_heads=4"):
        LLM(tiny_llama, tensor_parallel_size=3, **ENGINE)
    assert children() == []
    cfg = ModelConfig("LlamaForCausalLM", 1000, 64, 96, 1, 8, 3, 8, 1e-6, 1e4, 64, False, False, False)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 and num_key_value_heads=3"):
        check_tensor_parallel(cfg, 2)


def test_shard_plan_replicates_kv_heads():
    cfg = ModelConfig("LlamaForCausalLM", 1001, 64, 96, 1, 8, 2, 8, 1e-6, 1e4, 64, False, False, False)
    plans = [ShardPlan.make(cfg, r, 4) for r in range(4)]
    assert [p.q_start for p in plans] == [0, 2, 4, 6] and {p.num_heads for p in plans} == {2}
    # q heads 2r, 2r+1 use kv head (2r) // 4 in the full model: rank r's one kv head
    assert [(p.kv_start, p.num_kv_heads) for p in plans] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [(p.vocab_start, p.vocab_rows) for p in plans] == [(0, 251), (251, 251), (502, 251), (753, 248)]


def test_sharded_reads_equal_slices_of_the_full_tensors(tiny_models, smollm2_path):
    src = open_weights(Path(tiny_models["qwen2"]))
    name = "model.layers.0.self_attn.q_proj.weight"
    full = src.get(name)
    assert torch.equal(src.get(name, 0, 32, 96), full[32:96])
    assert torch.equal(src.get(name, 1, 5, 70), full[:, 5:70])
    gg = open_weights(smollm2_path)
    for name, dim, a, b in [
        ("model.layers.0.self_attn.q_proj.weight", 0, 192, 384),  # whole heads: un-permuted per head
        ("model.layers.0.self_attn.k_proj.weight", 0, 64, 128),
        ("model.layers.0.mlp.down_proj.weight", 1, 512, 1024),  # whole Q4_1 blocks
        ("model.layers.0.mlp.down_proj.weight", 1, 5, 70),  # not on block boundaries
        ("model.embed_tokens.weight", 0, 16384, 32768),
    ]:
        whole = gg.get(name)
        part = gg.get(name, dim, a, b)
        assert torch.equal(part, whole.narrow(dim, a, b - a)), name


def test_engine_gc_and_interpreter_exit_stop_workers(tiny_llama, tmp_path):
    llm = LLM(tiny_llama, tensor_parallel_size=2, **ENGINE)
    assert len(children()) >= 1
    del llm
    gc.collect()
    assert wait_no_children() == []
    script = tmp_path / "tp_exit.py"
    script.write_text(textwrap.dedent(f"""
        from portable_xy import LLM, SamplingParams

        def pid(runner):
            import os
            return os.getpid()

        if __name__ == "__main__":
            llm = LLM({tiny_llama!r}, backend="cpu", dtype="float32", max_model_len=64, tensor_parallel_size=2)
            print(llm.collective_rpc(pid)[1], flush=True)
            llm.generate([{{"prompt_token_ids": [5, 6, 7]}}], SamplingParams(max_tokens=4), use_tqdm=False)
            # no shutdown: interpreter exit stops the worker
    """))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    worker = int(run.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists(), "the worker outlived its engine process"
