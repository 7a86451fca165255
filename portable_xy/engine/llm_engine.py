"""The engine loop: requests in, one scheduled step at a time, finished outputs out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        block_manager: BlockManager,
        scheduler: Scheduler,
        tokenizer,
        eos_ids: list[int],
        max_model_len: int,
        seed: int,
    ) -> None:
        self.runner = runner
        self.bm = block_manager
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.rng = torch.Generator().manual_seed(seed)
        self.requests: dict[str, Request] = {}
        self._next_seq_id = 0
        self.num_steps = 0

    # ---- requests ----------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        metrics = RequestMetrics(arrival_time=time.time())
        req = Request(request_id, prompt, list(prompt_token_ids), params, metrics)
        for index in range(params.n):
            if params.seed is not None:
                gen = torch.Generator().manual_seed((params.seed * 65537 + index) % 2**63)
            else:
                gen = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=self.rng)))
            seq = Sequence(self._next_seq_id, request_id, index, prompt_token_ids, params, gen, metrics)
            self._next_seq_id += 1
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            for seq in req.seqs:
                if not seq.is_finished:
                    self.scheduler.abort(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> tuple[list[RequestOutput], int]:
        """Run one step. Returns the requests that finished in it and the number of tokens
        generated."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler could not schedule any sequence (KV cache too small?)")
            return [], 0
        now = time.time()
        for seq in batch.seqs:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        sampled = self.runner.run(batch, self.eos_ids)
        self.scheduler.postprocess(batch)
        now = time.time()
        done: list[RequestOutput] = []
        for seq in batch.seqs:
            res = sampled.get(seq.seq_id)
            if res is None:
                continue
            seq.token_ids.append(res.token_id)
            m = seq.metrics
            if seq.index == 0:
                m.first_token_time = m.first_token_time or now
                m.last_token_time = now
                m.num_generated_tokens = seq.num_output_tokens
            if seq.params.logprobs is not None:
                seq.cumulative_logprob += res.logprob
                seq.logprobs.append({t: Logprob(lp, rank, self._decode_one(t)) for t, lp, rank in res.top})
            self._check_stop(seq)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                req = self.requests[seq.request_id]
                if req.finished:
                    m.finished_time = now
                    done.append(self._make_output(self.requests.pop(seq.request_id)))
        self.num_steps += 1
        return done, len(sampled)

    # ---- stopping and detokenization ---------------------------------------------------------
    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _decode(self, seq: Sequence, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=seq.params.skip_special_tokens)

    def _check_stop(self, seq: Sequence) -> None:
        p = seq.params
        tok = seq.token_ids[-1]
        if not p.ignore_eos and tok in self.eos_ids:
            seq.finish_reason = "stop"
        elif tok in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
        elif p.stop_strings and self.tokenizer is not None:
            prev = len(seq.text)
            seq.text = self._decode(seq, seq.output_token_ids)
            for stop in p.stop_strings:
                at = seq.text.find(stop, max(0, prev - len(stop) + 1))
                if at >= 0:
                    seq.text = seq.text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return
        if seq.finish_reason is None and (
            (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or seq.num_tokens >= self.max_model_len
        ):
            seq.finish_reason = "length"

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            if not isinstance(seq.stop_reason, str):  # stop-string text was cut in _check_stop
                ids = seq.output_token_ids
                if seq.finish_reason == "stop" and not seq.params.include_stop_str_in_output:
                    ids = ids[:-1]  # EOS or a stop token id: not part of the text
                seq.text = self._decode(seq, ids)
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.text,
                    token_ids=seq.output_token_ids,
                    cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                    logprobs=seq.logprobs if seq.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=True,
            metrics=req.metrics,
            num_cached_tokens=req.metrics.num_cached_tokens,
        )
