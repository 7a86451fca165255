"""Engine behaviour: batch invariance, prefix caching, chunked prefill, preemption, metrics."""

from tiny_models import random_prompts

from portable_xy import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=20, min_tokens=20)


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_batch_invariance_16_mixed_lengths(tiny_llm):
    prompts = [{"prompt_token_ids": p} for p in random_prompts(16, [1, 3, 17, 60, 127, 5, 33, 90], seed=11)]
    batched = _ids(tiny_llm.generate(prompts, GREEDY, use_tqdm=False))
    alone = [_ids(tiny_llm.generate(p, GREEDY, use_tqdm=False))[0] for p in prompts]
    assert batched == alone


def test_prefix_caching_reuses_blocks_and_keeps_outputs(tiny_llama):
    shared = random_prompts(1, [200], seed=3)[0]  # 12 full 16-token blocks + 8 tokens into the 13th
    tails = random_prompts(2, [9, 14], seed=4)
    assert tails[0][0] != tails[1][0]
    prompts = [{"prompt_token_ids": shared + t} for t in tails]
    results = {}
    for caching, token_wise in ((True, True), (True, False), (False, False)):
        llm = LLM(
            tiny_llama, backend="cpu", dtype="float32", max_model_len=512,
            enable_prefix_caching=caching, enable_token_wise_reuse=token_wise,
        )  # fmt: skip
        first = llm.generate(prompts[0], GREEDY, use_tqdm=False)[0]
        second = llm.generate(prompts[1], GREEDY, use_tqdm=False)[0]
        assert first.num_cached_tokens == 0
        bs = llm.engine.bm.block_size
        if token_wise:  # the full blocks, then the 8 matching tokens of the 13th block by copy-on-write
            assert bs == 16 and second.num_cached_tokens == 200
            assert llm.engine.bm.num_copied_tokens == 200 % bs
        elif caching:
            assert second.num_cached_tokens == (200 // bs) * bs  # every full block of the shared prefix
        else:
            assert second.num_cached_tokens == 0
        stats = llm.get_metrics()
        assert stats["prefix_cache_hit_tokens"] == second.num_cached_tokens
        assert stats["prefix_cache_queried_tokens"] == len(prompts[0]["prompt_token_ids"]) + len(
            prompts[1]["prompt_token_ids"]
        )
        if caching:
            assert second.metrics.num_cached_tokens == second.num_cached_tokens
            assert stats["prefix_cache_hit_rate"] > 0
        results[caching, token_wise] = (first.outputs[0].token_ids, second.outputs[0].token_ids)
    assert results[True, True] == results[True, False] == results[False, False]


def test_chunked_prefill_and_preemption_keep_outputs(tiny_llama):
    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, [150, 40, 7, 90, 3, 61], seed=5)]
    ref_llm = LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=256)
    ref = _ids(ref_llm.generate(prompts, GREEDY, use_tqdm=False))
    # 16-token budget: every prompt is chunked; 24 blocks of 16 tokens cannot hold all six
    # sequences at once, so the scheduler must preempt and recompute.
    small = LLM(
        tiny_llama, backend="cpu", dtype="float32", max_model_len=256, max_num_batched_tokens=16, num_kv_blocks=24
    )
    got = _ids(small.generate(prompts, GREEDY, use_tqdm=False))
    assert got == ref
    assert small.engine.scheduler.num_preemptions > 0
    bm = small.engine.bm
    assert bm.num_free_blocks == len(bm.blocks)  # nothing leaked
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_metrics_are_filled(tiny_llm):
    out = tiny_llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.ttft > 0 and m.mean_tpot > 0 and m.num_generated_tokens == 20
    assert out.finished and out.request_id


def test_generate_accepts_strings_and_per_prompt_params(tiny_llm):
    outs = tiny_llm.generate(
        ["Hello there", "The sky is"], [SamplingParams(temperature=0, max_tokens=3), SamplingParams(max_tokens=5)],
        use_tqdm=False,
    )  # fmt: skip
    assert [o.prompt for o in outs] == ["Hello there", "The sky is"]
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    tok = tiny_llm.get_tokenizer()
    assert outs[0].prompt_token_ids == tok("Hello there")["input_ids"]


def test_chat_applies_template(tiny_llm):
    conv = [{"role": "user", "content": "hi"}]
    out = tiny_llm.chat(conv, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    tok = tiny_llm.get_tokenizer()
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert out.prompt == text
    assert out.prompt_token_ids == tok(text, add_special_tokens=False)["input_ids"]
    two = tiny_llm.chat([conv, conv], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_decode_kv_copies_keep_outputs(tiny_llama, monkeypatch):
    """The cpu backend's decode K/V copies (forced on at these tiny sizes) give the same greedy
    tokens as gathering the blocks every step, while requests of different lengths finish and
    the batch shrinks step by step."""
    from portable_xy.backends import cpu

    prompts = [{"prompt_token_ids": p} for p in random_prompts(6, [1, 3, 17, 60, 127, 5], seed=5)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (90, 3, 40, 17, 70, 1)]
    results = []
    for threshold in (0, 1 << 62):
        monkeypatch.setattr(cpu, "KV_COPY_MIN", threshold)
        llm = LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=512)
        results.append(_ids(llm.generate(prompts, params, use_tqdm=False)))
        assert bool(llm.engine.runner.backend._kv_copies) == (threshold == 0)
    assert results[0] == results[1]
