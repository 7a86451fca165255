"""`LLM`: the vLLM-shaped offline API (`generate`, `chat`) over the engine core."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from typing import Any

import torch
from tqdm.auto import tqdm

from .backends import Backend
from .config import EngineConfig
from .engine.llm_engine import LLMEngine
from .models.config import ModelConfig
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """An LLM for offline inference, with vLLM's constructor and ``generate``/``chat`` surface.

    ``LLM(model, **kwargs)``: the keyword arguments are :class:`~portable_xy.config.EngineConfig`'s
    fields (``backend``, ``dtype``, ``max_model_len``, ``max_num_seqs``, ``enable_prefix_caching``,
    ``speculative_config``, ...); an unknown one raises ``TypeError`` naming it.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.config = EngineConfig.from_kwargs("LLM", model=model, **kwargs)
        self.engine = LLMEngine.from_config(self.config)
        self._request_counter = 0

    @property
    def backend(self) -> Backend:
        return self.engine.runner.backend

    @property
    def dtype(self) -> torch.dtype:
        return self.config.dtype

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model_config

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def tokenizer(self) -> Any:
        """The HF tokenizer (None with ``skip_tokenizer_init=True``)."""
        return self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_metrics(self) -> dict[str, float]:
        """Engine counters since construction: steps, preemptions, prefix-cache queries and hits
        (token-wise: hits include tokens reused by copy-on-write), speculative drafts."""
        eng, bm = self.engine, self.engine.bm
        return {
            "num_steps": eng.num_steps,
            "num_preemptions": eng.scheduler.num_preemptions,
            "prefix_cache_queried_tokens": bm.num_queried_tokens,
            "prefix_cache_hit_tokens": bm.num_hit_tokens,
            "prefix_cache_copied_tokens": bm.num_copied_tokens,
            "prefix_cache_hit_rate": bm.prefix_cache_hit_rate,
            "spec_draft_tokens": eng.num_draft_tokens,
            "spec_accepted_tokens": eng.num_accepted_tokens,
            "spec_acceptance_rate": eng.num_accepted_tokens / eng.num_draft_tokens if eng.num_draft_tokens else 0.0,
        }

    # ---- generate ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | dict | Seq[str | dict],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Seq[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for ``prompts`` (a string, a ``{"prompt_token_ids": [...]}``
        dict, or a list of those). Returns one ``RequestOutput`` per prompt, in input order.
        ``priority``: one int per prompt (lower first) under ``scheduling_policy="priority"``."""
        items = self._normalize_prompts(prompts)
        params = self._normalize_params(sampling_params, len(items))
        if priority is None:
            priority = [0] * len(items)
        elif (
            not isinstance(priority, Seq)
            or len(priority) != len(items)
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in priority)
        ):
            raise ValueError(f"priority must be a list of {len(items)} ints (one per prompt), got {priority!r}")
        return self._run(items, params, use_tqdm, list(priority))

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (a list of message dicts) or a
        list of conversations, then generate."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer, but this LLM was built with skip_tokenizer_init=True")
        if not isinstance(messages, list) or not messages:
            raise ValueError(
                f"messages must be a non-empty list of message dicts or of conversations, got {messages!r}"
            )
        convs = [messages] if isinstance(messages[0], dict) else messages
        prompts = []
        for i, conv in enumerate(convs):
            if not isinstance(conv, list) or not all(isinstance(m, dict) and "role" in m for m in conv):
                raise ValueError(f"conversation {i} must be a list of {{'role': ..., 'content': ...}} dicts")
            text = self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    # ---- input checking (all before any request is queued, so bad input changes nothing) ------
    def _normalize_prompts(self, prompts) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, Seq) or isinstance(prompts, (bytes, bytearray)):
            raise TypeError(f"prompts must be a str, a dict or a list of those, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        vocab = self.model_config.vocab_size
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:
                    raise ValueError(f"prompt {i} is an empty string")
                if self.tokenizer is None:
                    raise ValueError(f"prompt {i} is text but no tokenizer is loaded; pass prompt_token_ids")
                text, ids = p, self.tokenizer(p)["input_ids"]
            elif isinstance(p, dict):
                if "prompt_token_ids" not in p:
                    raise ValueError(f"prompt {i} is a dict without 'prompt_token_ids': keys {sorted(p)}")
                text, ids = p.get("prompt"), p["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in ids
                ):
                    raise TypeError(f"prompt {i}: prompt_token_ids must be a list of int")
            else:
                raise TypeError(f"prompt {i} must be a str or a dict with 'prompt_token_ids', got {type(p).__name__}")
            if len(ids) == 0:
                raise ValueError(f"prompt {i} has no tokens")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {vocab})")
            if len(ids) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; max_model_len={self.max_model_len} leaves no room to generate"
                )
            out.append((text, list(ids)))
        return out

    @staticmethod
    def _normalize_params(sp, n: int) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, SamplingParams):
            return [sp] * n
        if isinstance(sp, Seq) and all(isinstance(s, SamplingParams) for s in sp):
            if len(sp) != n:
                raise ValueError(f"got {len(sp)} sampling_params for {n} prompts")
            return list(sp)
        raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(sp).__name__}")

    # ---- the loop ----------------------------------------------------------------------------
    def _run(self, items, params, use_tqdm: bool, priority: list[int]) -> list[RequestOutput]:
        ids = []
        for (text, toks), sp, prio in zip(items, params, priority):
            rid = str(self._request_counter)
            self._request_counter += 1
            self.engine.add_request(rid, text, toks, sp, prio)
            ids.append(rid)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start, generated0 = time.perf_counter(), self.engine.num_generated_tokens
        try:
            while self.engine.has_unfinished_requests():
                done = self.engine.step()
                generated = self.engine.num_generated_tokens - generated0
                for out in done:
                    results[out.request_id] = out
                    bar.update(1)
                bar.set_postfix_str(
                    f"output {generated / max(time.perf_counter() - start, 1e-9):.1f} tok/s", refresh=False
                )
        finally:
            bar.close()
            for rid in ids:  # an interrupted call must leave the engine clean for the next one
                if rid not in results:
                    self.engine.abort_request(rid)
        return [results[r] for r in ids]
