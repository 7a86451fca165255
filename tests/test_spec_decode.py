"""Speculative decoding: n-gram proposals, lossless verification (exact for greedy, the same
distribution for sampling), greedy invariance across budgets / prefix caching / speculation /
batch composition, metrics and config errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import random_prompts

from portable_xy import LLM, SamplingParams
from portable_xy.backends.reference import sample_ref
from portable_xy.engine.sequence import Sequence
from portable_xy.outputs import RequestMetrics
from portable_xy.spec_decode import filtered_probs, verify_drafts
from portable_xy.spec_decode.ngram import ngram_propose

ALPHA = 1e-3  # significance level of every statistical test here


def chi2_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Goodness-of-fit p-value; cells with small expected counts are pooled."""
    n = float(observed.sum())
    exp = expected_probs.double() * n
    big = exp >= min_expected
    obs_c = torch.cat([observed.double()[big], observed.double()[~big].sum().view(1)])
    exp_c = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = exp_c > 0
    assert bool((obs_c[~keep] == 0).all()), "a token outside the support was emitted"
    obs_c, exp_c = obs_c[keep], exp_c[keep]
    stat = float(((obs_c - exp_c) ** 2 / exp_c).sum())
    df = obs_c.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


# ---- n-gram proposer -------------------------------------------------------------------------
def _ngram_brute(toks, k, lo, hi):
    for n in range(min(hi, len(toks) - 1), lo - 1, -1):
        for j in range(len(toks) - n - 1, -1, -1):
            if toks[j : j + n] == toks[len(toks) - n :]:
                return toks[j + n : j + n + k]
    return []


def test_ngram_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        length = int(torch.randint(1, 40, (1,), generator=g))
        toks = torch.randint(0, 4, (length,), generator=g).tolist()
        lo = int(torch.randint(1, 4, (1,), generator=g))
        hi = lo + int(torch.randint(0, 3, (1,), generator=g))
        k = int(torch.randint(1, 6, (1,), generator=g))
        assert ngram_propose(toks, k, lo, hi) == _ngram_brute(toks, k, lo, hi)
    assert ngram_propose([5, 6, 7, 9, 5, 6], 3, 1, 3) == [7, 9, 5]  # longest match, then what followed


# ---- verification (unit level, exact conditional distributions) ------------------------------
def _seq(params: SamplingParams, seed: int) -> Sequence:
    return Sequence(0, "r", 0, [1], params, torch.Generator().manual_seed(seed), RequestMetrics(0.0))


class _Backend:
    def sample(self, logits, temperature, top_k, top_p, min_p, uniform):
        return sample_ref(logits, temperature, top_k, top_p, min_p, uniform)


def test_filtered_probs_is_what_sample_ref_draws_from():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 12, generator=g) * 2
    for temp, k, p, mp in [(1.0, -1, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, -1, 0.8, 0.0), (1.0, 6, 0.9, 0.1)]:
        probs = filtered_probs(logits, temp, k, p, mp)[0]
        n = 6000
        u = torch.rand(n, generator=g)
        rows = logits.expand(n, -1)
        draws = sample_ref(
            rows, torch.full((n,), temp), torch.full((n,), k), torch.full((n,), p), torch.full((n,), mp), u
        )
        counts = torch.bincount(draws, minlength=12)
        assert chi2_pvalue(counts, probs) > ALPHA


@pytest.mark.parametrize("proposal", ["one_hot", "draft"])
def test_verify_is_lossless(proposal):
    """Draft tokens d (ngram: one-hot q; draft model: d ~ q). The first emitted token must follow
    p_0, and the second, given the first equals d_0, must follow p_1 -- for any q."""
    g = torch.Generator().manual_seed(2)
    vocab, k = 8, 2
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.95)
    logits = torch.randn(k + 1, vocab, generator=g) * 1.5
    p = filtered_probs(logits, 0.9, 6, 0.95, 0.0)
    q = torch.softmax(torch.randn(k, vocab, generator=g), -1)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    seq = _seq(params, 3)
    n_accept = 0
    for _ in range(6000):
        if proposal == "draft":
            drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
            seq.draft_probs = q
        else:
            drafts = [int(torch.argmax(p[0])), int(torch.randint(vocab, (1,), generator=g))]
            seq.draft_probs = None
        seq.draft_token_ids = drafts
        out = verify_drafts(_Backend(), logits, seq)
        assert 1 <= len(out) <= k + 1
        first[out[0]] += 1
        if out[0] == drafts[0] and len(out) > 1:
            second[out[1]] += 1
        n_accept += len(out) - 1
    assert 0 < n_accept < 6000 * k  # both accepting and rejecting happened
    assert chi2_pvalue(first, p[0]) > ALPHA
    assert chi2_pvalue(second, p[1]) > ALPHA


def test_verify_greedy_accepts_exactly_the_argmax_prefix():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(4))
    target = logits.argmax(-1).tolist()
    seq = _seq(SamplingParams(temperature=0), 0)
    for drafts, want in [
        (target[:3], target[:4]),  # all accepted + bonus
        ([target[0], (target[1] + 1) % 10, target[2]], target[:2]),  # rejected at 1: correction
        ([(target[0] + 1) % 10, target[1], target[2]], target[:1]),
    ]:
        seq.draft_token_ids = drafts
        assert verify_drafts(_Backend(), logits, seq) == want


# ---- engine level ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def draft_models(tiny_models, tmp_path_factory):
    """A perturbed copy of the tiny Llama (partial acceptance) and the tiny Qwen3 (same vocab,
    unrelated weights: almost nothing accepted)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("draft-llama")
    model.save_pretrained(out)
    return {"perturbed": str(out), "qwen3": tiny_models["qwen3"]}


def _prompts():
    """Input-grounded prompts: repeated spans (n-gram hits) and shared prefixes (cache hits)."""
    base = random_prompts(4, [23, 9, 40, 5], seed=21)
    shared = base[2]
    return [
        {"prompt_token_ids": base[0] * 3},
        {"prompt_token_ids": shared + base[1] * 2},
        {"prompt_token_ids": shared + base[3]},
        {"prompt_token_ids": base[3] + base[1] + base[3]},
        {"prompt_token_ids": base[1]},
    ]


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _gen(llm: LLM, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_identical_across_budgets_caching_and_speculation(tiny_models, draft_models):
    model = tiny_models["llama"]
    prompts = _prompts()
    ref = _gen(LLM(model, backend="cpu", dtype="float32", max_model_len=512, enable_prefix_caching=False), prompts)
    specs = [
        None,
        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
        {"method": "draft_model", "model": draft_models["perturbed"], "num_speculative_tokens": 3},
    ]
    caching = [(True, True), (True, False), (False, False)]
    accepted = {}
    for i, (budget, spec) in enumerate(itertools.product([16, 64, 256, 2048], specs)):
        prefix, token_wise = caching[i % 3]
        llm = LLM(
            model, backend="cpu", dtype="float32", max_model_len=512, max_num_batched_tokens=budget,
            enable_prefix_caching=prefix, enable_token_wise_reuse=token_wise, speculative_config=spec,
        )  # fmt: skip
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref, (budget, spec, prefix, token_wise)
        if spec is not None:
            accepted[spec["method"], budget] = sum(o.metrics.num_accepted_tokens for o in outs)
            assert all(o.metrics.num_verify_steps > 0 for o in outs)
        # batch composition: alone, and in another order
        if budget == 64:
            assert _gen(llm, prompts[2]) == [ref[2]]
            assert _gen(llm, prompts[::-1]) == ref[::-1]
    assert all(v > 0 for v in accepted.values()), accepted  # drafts were really accepted


@pytest.mark.parametrize("variant", ["qwen2", "qwen3"])
def test_greedy_speculation_other_architectures(tiny_models, draft_models, variant):
    prompts = _prompts()[:3]
    ref = _gen(LLM(tiny_models[variant], backend="cpu", dtype="float32", max_model_len=512), prompts)
    for spec in (
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2},
        {"method": "draft_model", "model": draft_models["qwen3"], "num_speculative_tokens": 2},
    ):
        llm = LLM(
            tiny_models[variant], backend="cpu", dtype="float32", max_model_len=512,
            max_num_batched_tokens=32, speculative_config=spec,
        )  # fmt: skip
        assert _gen(llm, prompts) == ref


def _exact_joint(model_dir: str, prompt: list[int], steps: int, params: SamplingParams) -> dict[tuple, float]:
    """P(t1..t_steps) under the filtered sampling distribution, from HF transformers."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    paths = {(): 1.0}
    with torch.inference_mode():
        for _ in range(steps):
            nxt = {}
            for path, pr in paths.items():
                logits = hf(torch.tensor([prompt + list(path)])).logits[0, -1:].float()
                probs = filtered_probs(logits, params.temperature, params.top_k, params.top_p, params.min_p)[0]
                for t in torch.nonzero(probs).flatten().tolist():
                    nxt[path + (t,)] = pr * float(probs[t])
            paths = nxt
    return paths


@pytest.mark.parametrize("draft", ["perturbed", "qwen3"])
def test_sampling_distribution_matches_plain_sampling(tiny_models, draft_models, draft):
    """Temperature sampling with a draft model emits 3-token continuations distributed exactly as
    the target model's filtered distribution (chi-square goodness of fit, alpha = 1e-3), like
    plain sampling (checked the same way, so the test itself is calibrated)."""
    model = tiny_models["llama"]
    prompt = random_prompts(1, [12], seed=5)[0]
    params = SamplingParams(temperature=1.0, top_k=2, max_tokens=3, ignore_eos=True, seed=123, n=320)
    exact = _exact_joint(model, prompt, 3, params)
    cells = sorted(exact)
    probs = torch.tensor([exact[c] for c in cells])
    spec = {"method": "draft_model", "model": draft_models[draft], "num_speculative_tokens": 2}
    for cfg in (None, spec):
        llm = LLM(model, backend="cpu", dtype="float32", max_model_len=128, speculative_config=cfg)
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        counts = torch.zeros(len(cells))
        index = {c: i for i, c in enumerate(cells)}
        for c in out.outputs:
            counts[index[tuple(c.token_ids)]] += 1  # KeyError = a continuation outside the support
        assert chi2_pvalue(counts, probs) > ALPHA, cfg
        if cfg is not None:
            m = out.metrics
            assert m.num_draft_tokens > 0 and 0 <= m.num_accepted_tokens <= m.num_draft_tokens
            if draft == "perturbed":
                assert 0 < m.num_accepted_tokens < m.num_draft_tokens


def test_same_seed_same_text_with_speculation(tiny_llama):
    """Two engines, same seed: same text. (Not across cache states of one engine: reused prefix K/V
    was computed in a different batch shape, and on this near-uniform random model ULP-level logit
    differences move inverse-CDF draws.)"""
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    p = {"prompt_token_ids": random_prompts(1, [10], seed=9)[0] * 3}
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=42, max_tokens=12)
    outs = [
        _gen(LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=256, speculative_config=spec), p, params)
        for _ in range(2)
    ]
    assert outs[0] == outs[1]


def test_metrics_and_stop_inside_accepted_drafts(tiny_llama):
    """A stop token emitted among accepted drafts ends the output right there."""
    spec = {"method": "draft_model", "model": tiny_llama, "num_speculative_tokens": 4}  # itself: all accepted
    llm = LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=256, speculative_config=spec)
    prompt = {"prompt_token_ids": random_prompts(1, [15], seed=10)[0]}
    full = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    m = full.metrics
    assert m.num_accepted_tokens == m.num_draft_tokens > 0 and m.mean_acceptance_length > 2
    toks = full.outputs[0].token_ids
    stop_at = next(i for i in range(2, len(toks)) if toks[i] not in toks[:i])
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[toks[stop_at]])
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == toks[: stop_at + 1] and out.finish_reason == "stop"


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt"),
        ({"method": "ngram", "num_speculative_tokens": 2, "bogus": 1}, "unknown"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
        ("ngram", "dict"),
    ],
)
def test_bad_speculative_config(tiny_llama, tiny_llm, cfg, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LLM(tiny_llama, backend="cpu", dtype="float32", max_model_len=256, speculative_config=cfg)
    assert _gen(tiny_llm, {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=2))
