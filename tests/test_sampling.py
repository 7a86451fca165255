"""Sampling semantics through the engine (tiny Llama, fp32) and the backend sampling op."""

import pytest
import torch
from tiny_models import random_prompts

from portable_xy import SamplingParams
from portable_xy.backends.reference import sample_ref

PROMPTS = [{"prompt_token_ids": p} for p in random_prompts(3, [5, 12, 30], seed=7)]


def toks(outs):
    return [c.token_ids for o in outs for c in o.outputs]


def test_same_seed_same_output_and_different_seed_differs(tiny_llm):
    sp = lambda seed: SamplingParams(temperature=1.0, seed=seed, max_tokens=16)
    a = toks(tiny_llm.generate(PROMPTS, sp(123), use_tqdm=False))
    b = toks(tiny_llm.generate(PROMPTS, sp(123), use_tqdm=False))
    c = toks(tiny_llm.generate(PROMPTS, sp(124), use_tqdm=False))
    assert a == b
    assert a != c


def test_engine_seed_makes_unseeded_requests_reproducible(tiny_llama):
    from portable_xy import LLM

    runs = []
    for _ in range(2):
        llm = LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=128, seed=5)
        runs.append(toks(llm.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=8), use_tqdm=False)))
    assert runs[0] == runs[1]


def test_top_k_1_equals_greedy(tiny_llm):
    greedy = toks(tiny_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False))
    topk1 = toks(tiny_llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_k=1, max_tokens=16), use_tqdm=False))
    assert greedy == topk1


def test_top_k_through_engine_never_leaves_the_top_k(tiny_llm):
    k = 4
    sp = SamplingParams(temperature=1.5, top_k=k, logprobs=0, max_tokens=16, n=8, seed=1)
    outs = tiny_llm.generate(PROMPTS, sp, use_tqdm=False)
    draws = 0
    for o in outs:
        for c in o.outputs:
            for tok, lp in zip(c.token_ids, c.logprobs):
                assert lp[tok].rank <= k, f"sampled token {tok} has rank {lp[tok].rank} > top_k={k}"
                draws += 1
    assert draws == 3 * 8 * 16


def _peaked_logits(v=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, generator=g) * 3


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (0, 0.7, 0.0), (10, 0.5, 0.0), (0, 1.0, 0.2)])
def test_sampling_op_stays_in_allowed_set_and_matches_distribution(top_k, top_p, min_p):
    logits = _peaked_logits()
    n = 4000
    g = torch.Generator().manual_seed(1)
    rows = logits.expand(n, -1).contiguous()
    full = lambda x: torch.full((n,), x)
    out = sample_ref(rows, full(1.0), full(top_k).long(), full(top_p), full(min_p), torch.rand(n, generator=g))
    probs = logits.softmax(-1)
    order = torch.argsort(probs, descending=True, stable=True)
    p_sorted = probs[order]
    keep = torch.ones_like(p_sorted, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False
    kept_mass = p_sorted[keep].sum()
    before = torch.cumsum(torch.where(keep, p_sorted, 0), 0) - p_sorted
    if top_p < 1:
        keep &= before < top_p * kept_mass
    if min_p > 0:
        keep &= p_sorted >= min_p * p_sorted[0]
    allowed = set(order[keep].tolist())
    assert set(out.tolist()) <= allowed
    # empirical frequencies follow the renormalised kept distribution (loose 5-sigma bound)
    target = torch.zeros_like(probs)
    target[order[keep]] = p_sorted[keep] / p_sorted[keep].sum()
    freq = torch.bincount(out, minlength=logits.numel()).float() / n
    sigma = (target * (1 - target) / n).sqrt()
    assert bool(((freq - target).abs() <= 5 * sigma + 1e-3).all())


def test_stop_string_and_stop_token_id(tiny_llm):
    prompt = PROMPTS[1]
    base = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, min_tokens=24), use_tqdm=False)[0]
    text, ids = base.outputs[0].text, base.outputs[0].token_ids
    tok = tiny_llm.get_tokenizer()
    # a stop string taken from the middle of the greedy text
    start = len(tok.decode(ids[:6], skip_special_tokens=True))
    stop = text[start : start + 3]
    assert stop and stop in text
    cut = text.index(stop)
    out = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert (c.finish_reason, c.stop_reason, c.text) == ("stop", stop, text[:cut])
    out = tiny_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=24, stop=stop, include_stop_str_in_output=True), use_tqdm=False
    )[0]
    assert out.outputs[0].text == text[: cut + len(stop)]
    # a stop token id: generation ends right after its first occurrence
    stop_id = ids[8]
    first = ids.index(stop_id)
    c = tiny_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id]), use_tqdm=False
    )[0].outputs[0]
    assert (c.finish_reason, c.stop_reason, c.token_ids) == ("stop", stop_id, ids[: first + 1])
    # min_tokens holds the stop token back for the first tokens
    c = tiny_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[ids[0]], min_tokens=3), use_tqdm=False
    )[0].outputs[0]
    assert ids[0] not in c.token_ids[:3]
    # plain max_tokens: finish_reason length
    c = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0]
    assert (c.finish_reason, c.stop_reason, len(c.token_ids)) == ("length", None, 5)


def test_n_returns_n_completions(tiny_llm):
    out = tiny_llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=12), use_tqdm=False)
    assert len(out) == 1
    comps = out[0].outputs
    assert [c.index for c in comps] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in comps)
    assert len({tuple(c.token_ids) for c in comps}) == 3


def test_logprobs_match_hf_log_softmax(tiny_llm, tiny_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    prompt = PROMPTS[2]["prompt_token_ids"]
    c = tiny_llm.generate(
        PROMPTS[2], SamplingParams(temperature=0.7, seed=9, max_tokens=10, logprobs=3), use_tqdm=False
    )[0].outputs[0]
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + c.token_ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    total = 0.0
    for t, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        assert abs(entry[tok].logprob - float(lp[t, tok])) < 1e-4
        vals, idx = torch.topk(lp[t], 3)
        for v, i in zip(vals.tolist(), idx.tolist()):
            assert abs(entry[i].logprob - v) < 1e-4
        assert len(entry) in (3, 4)  # top-3 plus the sampled token when it is not among them
        total += entry[tok].logprob
    assert abs(c.cumulative_logprob - total) < 1e-4


def test_repetition_penalty_matches_hf(tiny_llm, tiny_llama):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    prompt = PROMPTS[1]["prompt_token_ids"]
    with torch.inference_mode():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
            repetition_penalty=1.5, pad_token_id=0,
        )[0, len(prompt) :].tolist()  # fmt: skip
    sp = SamplingParams(temperature=0, max_tokens=16, min_tokens=16, repetition_penalty=1.5)
    assert tiny_llm.generate(PROMPTS[1], sp, use_tqdm=False)[0].outputs[0].token_ids == ref


def test_presence_and_frequency_penalties():
    from portable_xy.engine.sampler import _apply_penalties
    from portable_xy.engine.sequence import Sequence
    from portable_xy.outputs import RequestMetrics

    seq = Sequence(0, "r", 0, [1, 2], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), None,
                   RequestMetrics(0.0))  # fmt: skip
    seq.token_ids += [3, 3, 4]
    logits = torch.zeros(6)
    _apply_penalties(logits, seq)
    # output tokens 3 (twice) and 4 (once) are penalised; prompt tokens 1, 2 are not
    assert logits.tolist() == [0, 0, 0, -(0.5 + 2 * 0.25), -(0.5 + 0.25), 0]
