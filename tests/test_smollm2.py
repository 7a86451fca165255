"""SmolLM2-135M-Instruct (the default model, GGUF) end to end against HF transformers."""

import pytest
import torch

from portable_xy import LLM, SamplingParams

# A greedy flip is accepted only where HF itself sees a near tie: the log-probabilities of the two
# candidate tokens differ by less than this (fp32 summation order alone moves logits ~1e-5).
NEAR_TIE_LOGPROB = 1e-3
CHATS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give me three tips for learning to code.",
]
NEW = 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )


def compare_with_near_ties(ours: list[int], hf_tokens: list[int], hf_logprobs: list[torch.Tensor]) -> int:
    """Number of tokens compared; fails on any mismatch that is not a documented near tie."""
    for t, (a, b) in enumerate(zip(ours, hf_tokens)):
        if a != b:
            gap = float(hf_logprobs[t][b] - hf_logprobs[t][a])
            assert gap < NEAR_TIE_LOGPROB, f"token {t}: ours {a} vs HF {b}, HF log-prob gap {gap:.2e}"
            return t
    assert len(ours) == len(hf_tokens)
    return len(ours)


def test_default_model_greedy_matches_hf(smollm2_path, hf_smollm2):
    llm = LLM(dtype="float32")  # model=None: the default SmolLM2 GGUF
    assert llm.model_config.architecture == "LlamaForCausalLM"
    tok = llm.get_tokenizer()
    convs = [[{"role": "user", "content": c}] for c in CHATS]
    params = SamplingParams(temperature=0, max_tokens=NEW)
    outs = llm.chat(convs, params, use_tqdm=False)
    compared = 0
    for conv, out in zip(convs, outs):
        ids = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = tok(ids, add_special_tokens=False)["input_ids"]
        assert out.prompt_token_ids == ids
        with torch.inference_mode():
            gen = hf_smollm2.generate(
                torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                output_scores=True, return_dict_in_generate=True, pad_token_id=2,
            )  # fmt: skip
        hf_tokens = gen.sequences[0, len(ids) :].tolist()
        hf_lp = [torch.log_softmax(s[0].float(), -1) for s in gen.scores]
        compared += compare_with_near_ties(out.outputs[0].token_ids, hf_tokens, hf_lp)
        if hf_tokens[-1] == 2:  # HF stopped on EOS: so must we, with the same text
            assert out.outputs[0].finish_reason == "stop"
            assert out.outputs[0].text == tok.decode(hf_tokens, skip_special_tokens=True)
    assert compared >= len(CHATS) * 8


def test_greedy_identical_across_scheduling_and_speculation(smollm2_path, tiny_llama):
    """fp32 SmolLM2 on input-grounded chats: the same greedy tokens for budgets 16 and 2048, prefix
    caching (token-wise) on and off, and speculation off / n-gram / draft model (SmolLM2 itself:
    nearly everything accepted; a tiny random model with SmolLM2's vocabulary: nearly nothing)."""
    text = "The quick brown fox jumps over the lazy dog. The dog sleeps while the fox runs away."
    chats = [
        [{"role": "user", "content": f"Repeat this text exactly: {text}"}],
        [{"role": "user", "content": f"Repeat this text exactly, then say done: {text}"}],
        [{"role": "user", "content": CHATS[0]}],
    ]
    params = SamplingParams(temperature=0, max_tokens=NEW)
    ref = None
    configs = [
        dict(max_num_batched_tokens=2048),
        dict(max_num_batched_tokens=16, enable_prefix_caching=False),
        dict(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}),
        dict(max_num_batched_tokens=64, speculative_config={
            "method": "draft_model", "model": str(smollm2_path), "num_speculative_tokens": 3}),
        dict(speculative_config={"method": "draft_model", "model": tiny_llama, "num_speculative_tokens": 2}),
    ]  # fmt: skip
    for cfg in configs:
        llm = LLM(dtype="float32", max_model_len=1024, **cfg)
        outs = llm.chat(chats, params, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        if ref is None:
            ref = got
            continue
        assert got == ref, cfg
        if "speculative_config" in cfg:
            acc = sum(o.metrics.num_accepted_tokens for o in outs)
            drafts = sum(o.metrics.num_draft_tokens for o in outs)
            assert drafts > 0
            spec = cfg["speculative_config"]
            if spec["method"] == "ngram":
                assert acc > 0, cfg  # the repeat prompts: some prompt lookups hit
            elif spec["model"] == str(smollm2_path):
                assert acc >= 0.9 * drafts, cfg  # its own draft: greedy drafts are the target's tokens
