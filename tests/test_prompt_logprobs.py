"""``SamplingParams(prompt_logprobs=k)`` against HF transformers' fp32 log_softmax on tiny random
models: values, ranks and top-k sets, under chunked prefill, prefix caching, preemption and n-gram
speculation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_VARIANTS, random_prompts

from portable_xy import LLM, SamplingParams
from portable_xy.engine.llm_engine import LLMEngine
from portable_xy.sampling_params import RequestOutputKind

TOL = 1e-4
K = 5
LENGTHS = [1, 2, 9, 40, 77]


def _hf_logprobs(model_dir: str, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt, HF's fp32 log_softmax ``[T, V]`` of the raw logits (row i predicts token i+1)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        return [torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), -1) for p in prompts]


def _rank_ok(rank: int, row: torch.Tensor, tok: int) -> bool:
    """``rank`` is token ``tok``'s rank in HF's ``row`` up to the values' tolerance: every token more
    than 2 x TOL above it ranks before it, every token more than 2 x TOL below after it (ties
    closer than that may order either way: the engine's logits round differently from HF's)."""
    above = int((row > row[tok] + 2 * TOL).sum())
    not_below = int((row >= row[tok] - 2 * TOL).sum())  # includes tok itself
    return above + 1 <= rank <= not_below


def _check(plp, prompt: list[int], ref: torch.Tensor, k: int, tokenizer=None) -> None:
    """``plp`` (an output's prompt_logprobs) against HF's log_softmax ``ref`` of ``prompt``."""
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    for i in range(1, len(prompt)):
        row, tok, entry = ref[i - 1], prompt[i], plp[i]
        assert tok in entry, f"position {i}: the prompt token is missing"
        assert abs(entry[tok].logprob - float(row[tok])) < TOL, f"position {i}"
        assert _rank_ok(entry[tok].rank, row, tok), f"position {i}: rank"
        vals, idx = torch.topk(row, k)
        assert set(entry) == set(idx.tolist()) | {tok}, f"position {i}: top-{k} set"
        for r, (v, t) in enumerate(zip(vals.tolist(), idx.tolist()), 1):
            assert abs(entry[t].logprob - v) < TOL
            if t != tok:
                assert _rank_ok(entry[t].rank, row, t), f"position {i}: rank of top-{r}"
        if tokenizer is not None:
            assert all(lp.decoded_token == tokenizer.decode([t]) for t, lp in entry.items())


def _same(a, b, tol: float = TOL, ref: torch.Tensor | None = None) -> None:
    """Two prompt_logprobs lists agree: same tokens and ranks, logprobs within ``tol``. With HF's
    log_softmax ``ref`` of the prompt, ranks need only agree up to the near-ties :func:`_rank_ok`
    allows (computations that round differently, e.g. other chunk sizes)."""
    assert len(a) == len(b) and a[0] is None and b[0] is None
    for i, (x, y) in enumerate(zip(a[1:], b[1:])):
        assert set(x) == set(y)
        for t in x:
            assert abs(x[t].logprob - y[t].logprob) < tol
            if ref is None:
                assert x[t].rank == y[t].rank
            else:
                assert _rank_ok(x[t].rank, ref[i], t) and _rank_ok(y[t].rank, ref[i], t)


def _llm(path: str, **kw) -> LLM:
    return LLM(path, backend="cpu", dtype="float32", max_model_len=256, **kw)


def _req(p: list[int]) -> dict:
    return {"prompt_token_ids": p}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(len(LENGTHS), LENGTHS, seed=7)


@pytest.fixture(scope="module")
def hf_ref(tiny_llama, prompts) -> list[torch.Tensor]:
    return _hf_logprobs(tiny_llama, prompts)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_prompt_logprobs_match_hf(tiny_models, prompts, variant):
    path = tiny_models[variant]
    ref = _hf_logprobs(path, prompts)
    llm = _llm(path)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=K)
    outs = llm.generate([_req(p) for p in prompts], params, use_tqdm=False)
    plain = llm.generate([_req(p) for p in prompts], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    for p, r, out, base in zip(prompts, ref, outs, plain):
        _check(out.prompt_logprobs, p, r, K, llm.tokenizer)
        assert out.outputs[0].token_ids == base.outputs[0].token_ids  # sampling unchanged
        assert base.prompt_logprobs is None  # not asked for: None, as before


def test_chunked_prefill_equals_one_chunk(tiny_llama, prompts, hf_ref):
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=K)
    one = _llm(tiny_llama).generate([_req(p) for p in prompts], params, use_tqdm=False)
    for budget in (1, 7, 16):  # every prompt over several steps, cut at every kind of boundary
        llm = _llm(tiny_llama, max_num_batched_tokens=budget)
        # batched with requests that did not ask for prompt logprobs (their steps return one row)
        mixed = [params if i % 2 == 0 else SamplingParams(temperature=0, max_tokens=3) for i in range(len(prompts))]
        got = llm.generate([_req(p) for p in prompts], mixed, use_tqdm=False)
        for i, (p, r, a, b) in enumerate(zip(prompts, hf_ref, one, got)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            if i % 2 == 0:
                _check(b.prompt_logprobs, p, r, K)
                _same(a.prompt_logprobs, b.prompt_logprobs, ref=r)
            else:
                assert b.prompt_logprobs is None


def test_prefix_cache_hit_is_not_taken(tiny_llama, prompts, hf_ref):
    llm = _llm(tiny_llama, enable_prefix_caching=True)
    p, ref = prompts[-1], hf_ref[-1]
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=K)
    warm = llm.generate(_req(p), SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    first = llm.generate(_req(p), params, use_tqdm=False)[0]
    second = llm.generate(_req(p), params, use_tqdm=False)[0]
    for out in (first, second):
        assert out.num_cached_tokens == 0  # computed the whole prompt despite the cached blocks
        _check(out.prompt_logprobs, p, ref, K)
        assert out.outputs[0].token_ids == warm.outputs[0].token_ids
    _same(first.prompt_logprobs, second.prompt_logprobs, tol=1e-6)
    # the blocks are still cached for requests without prompt logprobs
    again = llm.generate(_req(p), SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.prompt_logprobs is None
    # n > 1: one prompt_logprobs list per request
    two = llm.generate(_req(p), params.clone(n=2, temperature=1.0, seed=3), use_tqdm=False)[0]
    assert len(two.outputs) == 2
    _check(two.prompt_logprobs, p, ref, K)


def test_preemption_keeps_prompt_logprobs(tiny_llama, prompts, hf_ref):
    # 16-token budget and 16 blocks of 16 tokens for ten sequences: prompts are chunked and sequences preempted
    llm = _llm(tiny_llama, max_num_batched_tokens=16, num_kv_blocks=16)
    params = SamplingParams(temperature=0, max_tokens=40, min_tokens=40, prompt_logprobs=2)
    outs = llm.generate([_req(p) for p in prompts * 2], params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for p, r, out in zip(prompts * 2, hf_ref * 2, outs):
        _check(out.prompt_logprobs, p, r, 2)
    bm = llm.engine.bm
    assert bm.num_free_blocks == len(bm.blocks)


def test_ngram_speculation(tiny_llama):
    base = random_prompts(2, [11, 6], seed=21)
    ps = [base[0] * 3, base[1] + base[0] + base[1]]  # repeated spans: n-gram drafts
    ref = _hf_logprobs(tiny_llama, ps)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    params = SamplingParams(temperature=0, max_tokens=12, prompt_logprobs=K)  # (min_tokens: no drafts)
    plain = _llm(tiny_llama).generate([_req(p) for p in ps], params, use_tqdm=False)
    llm = _llm(tiny_llama, max_num_batched_tokens=8, speculative_config=spec)
    outs = llm.generate([_req(p) for p in ps], params, use_tqdm=False)
    assert sum(o.metrics.num_verify_steps for o in outs) > 0  # drafts were verified
    for p, r, out, base_out in zip(ps, ref, outs, plain):
        _check(out.prompt_logprobs, p, r, K)
        assert out.outputs[0].token_ids == base_out.outputs[0].token_ids


def test_k0_only_the_prompt_token_and_whole_vocabulary(tiny_llm, prompts, hf_ref):
    p, ref = prompts[2], hf_ref[2]
    out = tiny_llm.generate(_req(p), SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None
    for i in range(1, len(p)):
        entry = out.prompt_logprobs[i]
        assert list(entry) == [p[i]]
        assert abs(entry[p[i]].logprob - float(ref[i - 1, p[i]])) < TOL
        assert entry[p[i]].rank == int((ref[i - 1] > ref[i - 1, p[i]]).sum()) + 1
    short = prompts[1]  # 2 tokens: one scored position, the whole vocabulary
    out = tiny_llm.generate(_req(short), SamplingParams(max_tokens=1, prompt_logprobs=-1), use_tqdm=False)[0]
    entry = out.prompt_logprobs[1]
    vocab = tiny_llm.model_config.vocab_size
    assert sorted(entry) == list(range(vocab))
    got = torch.tensor([entry[t].logprob for t in range(vocab)])
    assert float((got - hf_ref[1][0]).abs().max()) < TOL
    assert entry[short[1]].rank == int((hf_ref[1][0] > hf_ref[1][0, short[1]]).sum()) + 1
    others = sorted(lp.rank for t, lp in entry.items() if t != short[1])
    assert len(set(others)) == vocab - 1 and others[0] >= 1 and others[-1] <= vocab
    # k above the vocabulary: the whole vocabulary
    big = tiny_llm.generate(_req(short), SamplingParams(max_tokens=1, prompt_logprobs=vocab + 5), use_tqdm=False)[0]
    assert set(big.prompt_logprobs[1]) == set(entry)
    # a one-token prompt has nothing to score
    one = tiny_llm.generate(_req(prompts[0]), SamplingParams(max_tokens=1, prompt_logprobs=3), use_tqdm=False)[0]
    assert one.prompt_logprobs == [None]


def test_bad_values_raise():
    for bad in (-2, -100):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    for bad in (1.5, "3", True):
        with pytest.raises(TypeError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)
    assert SamplingParams().prompt_logprobs is None
    assert SamplingParams(prompt_logprobs=-1).clone().prompt_logprobs == -1


def test_delta_outputs_carry_them_once(tiny_llm, prompts, hf_ref):
    engine: LLMEngine = tiny_llm.engine
    p, ref = prompts[3], hf_ref[3]
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1, output_kind=RequestOutputKind.DELTA)
    engine.add_request("delta-plp", None, p, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == "delta-plp"]
    assert len(outs) >= 2
    _check(outs[0].prompt_logprobs, p, ref, 1)
    assert all(o.prompt_logprobs == [] for o in outs[1:])


def test_scheduler_rows_and_no_prefix_hits():
    from portable_xy.engine.block_manager import BlockManager
    from portable_xy.engine.scheduler import Scheduler, SchedulerConfig
    from portable_xy.engine.sequence import Sequence
    from portable_xy.outputs import RequestMetrics

    bm = BlockManager(32, 4)
    sched = Scheduler(bm, SchedulerConfig(max_num_batched_tokens=8))
    prompt = list(range(10, 21))  # 11 tokens

    def seq(i: int, **kw) -> Sequence:
        s = Sequence(i, str(i), 0, prompt, SamplingParams(max_tokens=2, **kw), None, RequestMetrics(0.0))
        sched.add(s)
        return s

    def run(batch) -> None:  # what the engine does after a step, minus the tokens
        sched.postprocess(batch)
        for st in batch.stages:
            if st.prompt_logprob_positions:
                st.seq.prompt_logprobs += [{}] * len(st.prompt_logprob_positions)

    a = seq(0)
    batch = sched.schedule()
    assert [(st.start, st.num_tokens, st.num_logits) for st in batch.stages] == [(0, 8, 0)]
    run(batch)
    batch = sched.schedule()
    assert [(st.start, st.num_tokens, st.num_logits, st.samples) for st in batch.stages] == [(8, 3, 1, True)]
    run(batch)
    a.token_ids.append(5)
    sched.finish(a)  # its prompt's blocks stay cached
    b = seq(1, prompt_logprobs=2)
    batch = sched.schedule()
    assert b.num_computed_tokens == 0 and bm.num_hit_tokens == 0  # no prefix-cache hit taken
    st = batch.stages[0]
    assert (st.start, st.num_tokens, st.num_logits, st.samples) == (0, 8, 8, False)
    assert st.prompt_logprob_positions == range(0, 8)  # position i scores prompt token i + 1
    run(batch)
    batch = sched.schedule()
    st = batch.stages[0]
    assert (st.start, st.num_tokens, st.num_logits, st.samples) == (8, 3, 3, True)
    assert st.prompt_logprob_positions == range(8, 10)  # the last row (position 10) samples
    run(batch)
    assert len(b.prompt_logprobs) == len(prompt) and not b.prompt_logprobs_pending
