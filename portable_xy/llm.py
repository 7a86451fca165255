"""`LLM`: the vLLM-shaped offline API (`generate`, `chat`) over the engine core."""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import torch
from tqdm.auto import tqdm

from .backends import Backend
from .config import EngineConfig
from .engine.input_processor import InputProcessor, PromptType
from .engine.llm_engine import LLMEngine
from .models.config import ModelConfig
from .outputs import RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams


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

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (no-op without them); also done when the
        ``LLM`` is garbage-collected and at interpreter exit. The ``LLM`` cannot generate after it."""
        self.engine.shutdown()

    def collective_rpc(self, method: str | Callable, args: tuple = ()) -> list[Any]:
        """Call ``method`` on the model runner of every tensor-parallel rank: a method name, or a
        picklable function called as ``method(runner, *args)``. Returns the results in rank order."""
        return self.engine.collective_rpc(method, args)

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

    @property
    def input_processor(self) -> InputProcessor:
        """Checks and tokenizes prompts and conversations (what ``generate`` and ``chat`` use)."""
        return self.engine.inputs

    def get_metrics(self) -> dict[str, float]:
        """Engine counters since construction: steps, preemptions, prefix-cache queries and hits
        (token-wise: hits include tokens reused by copy-on-write), speculative drafts."""
        eng, s = self.engine, self.engine.scheduler.stats()
        queried = s.prefix_cache_queried_tokens
        return {
            "num_steps": eng.num_steps,
            "num_preemptions": s.num_preemptions,
            "prefix_cache_queried_tokens": queried,
            "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens,
            "prefix_cache_copied_tokens": s.prefix_cache_copied_tokens,
            "prefix_cache_hit_rate": s.prefix_cache_hit_tokens / queried if queried else 0.0,
            "spec_draft_tokens": eng.num_draft_tokens,
            "spec_accepted_tokens": eng.num_accepted_tokens,
            "spec_acceptance_rate": eng.num_accepted_tokens / eng.num_draft_tokens if eng.num_draft_tokens else 0.0,
        }

    # ---- generate ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Seq[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for ``prompts`` (a string, a ``{"prompt_token_ids": [...]}``
        dict, or a list of those). Returns one ``RequestOutput`` per prompt, in input order.
        ``priority``: one int per prompt (lower first) under ``scheduling_policy="priority"``."""
        items = self.input_processor.prompts(prompts)
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
        prompts = self.input_processor.chat(messages, add_generation_prompt, chat_template)
        return self.generate(prompts, sampling_params, use_tqdm)

    # ---- input checking (all before any request is queued, so bad input changes nothing) ------
    @staticmethod
    def _normalize_params(sp, n: int) -> list[SamplingParams]:
        """One ``SamplingParams`` per prompt, each returning its request's output once, when it
        finishes (``RequestOutputKind.FINAL_ONLY``; the caller's objects are not changed)."""
        if sp is None:
            sp = SamplingParams()
        if isinstance(sp, SamplingParams):
            return [sp.clone(output_kind=RequestOutputKind.FINAL_ONLY)] * n
        if isinstance(sp, Seq) and all(isinstance(s, SamplingParams) for s in sp):
            if len(sp) != n:
                raise ValueError(f"got {len(sp)} sampling_params for {n} prompts")
            final = {id(s): s.clone(output_kind=RequestOutputKind.FINAL_ONLY) for s in sp}
            return [final[id(s)] for s in sp]
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
                done = self.engine.step()  # FINAL_ONLY requests: the outputs of finished ones
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
