"""Greedy outputs token-identical to HF transformers on tiny random Llama / Qwen2 / Qwen3."""

import pytest
from tiny_models import TINY_VARIANTS, hf_greedy, random_prompts

from portable_xy import LLM, SamplingParams

LENGTHS = [1, 7, 19, 40, 77]
NEW = 32


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_greedy_matches_hf_single_and_batched(variant, tiny_models):
    path = tiny_models[variant]
    prompts = random_prompts(5, LENGTHS, seed=len(variant))
    expected = hf_greedy(path, prompts, NEW)
    llm = LLM(path, backend="cpu", dtype="float32", max_model_len=256, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=NEW, min_tokens=NEW)
    batched = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for i, p in enumerate(prompts):
        single = llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0]
        assert single.outputs[0].token_ids == expected[i], f"{variant} prompt {i} alone"
        assert batched[i].outputs[0].token_ids == expected[i], f"{variant} prompt {i} in a batch"
        assert batched[i].prompt_token_ids == p
        assert batched[i].outputs[0].finish_reason == "length"
