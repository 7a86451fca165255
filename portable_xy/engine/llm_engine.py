"""The engine loop: requests in, one scheduled step at a time, finished outputs out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from ..spec_decode.config import SpeculativeConfig
from ..spec_decode.rejection import verify_drafts
from .block_manager import BlockManager
from .model_runner import ModelRunner, StageInput
from .sampler import SampleResult, sample
from .scheduler import ScheduledBatch, Scheduler
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
        spec: SpeculativeConfig | None = None,
        proposer=None,
    ) -> None:
        self.runner = runner
        self.spec = spec
        self.proposer = proposer  # NgramProposer | DraftModelProposer | None
        scheduler.num_spec_tokens = self.num_spec_tokens
        self.bm = block_manager
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.rng = torch.Generator().manual_seed(seed)
        self.requests: dict[str, Request] = {}
        self._next_seq_id = 0
        self.num_steps = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    # ---- requests ----------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> None:
        metrics = RequestMetrics(arrival_time=time.time())
        req = Request(request_id, prompt, list(prompt_token_ids), params, metrics)
        for index in range(params.n):
            if params.seed is not None:
                gen = torch.Generator().manual_seed((params.seed * 65537 + index) % 2**63)
            else:
                gen = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=self.rng)))
            seq = Sequence(self._next_seq_id, request_id, index, prompt_token_ids, params, gen, metrics, priority)
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
        if not batch.stages:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler could not schedule any sequence (KV cache too small?)")
            return [], 0
        now = time.time()
        for seq in batch.seqs:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        copies = self.bm.take_pending_copies()
        if copies:
            self.runner.copy_blocks(copies)
            if self.proposer is not None and hasattr(self.proposer, "copy_blocks"):
                self.proposer.copy_blocks(copies)
        self._propose(batch)
        new_tokens = self._run_and_sample(batch)
        verify = [st for st in batch.stages if st.kind == "V"]
        rejected = {st.seq.seq_id: st.num_tokens - len(new_tokens[st.seq.seq_id]) for st in verify}
        self.scheduler.postprocess(batch, rejected)
        now = time.time()
        done: list[RequestOutput] = []
        generated = 0
        for st in batch.stages:
            seq = st.seq
            seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)
            seq.draft_token_ids, seq.draft_probs = [], None
            for res in new_tokens.get(seq.seq_id, ()):
                self._append(seq, res, now)
                generated += 1
                if seq.finish_reason is not None:
                    break
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                req = self.requests[seq.request_id]
                if req.finished:
                    seq.metrics.finished_time = now
                    done.append(self._make_output(self.requests.pop(seq.request_id)))
        self.num_steps += 1
        return done, generated

    def _propose(self, batch: ScheduledBatch) -> None:
        """Draft tokens for the step's verify stages; a stage that got fewer drafts than the room
        it reserved shrinks (to a plain decode when it got none)."""
        verify = [st for st in batch.stages if st.kind == "V"]
        if self.proposer is None or not (verify or self.spec.method == "draft_model"):
            return
        if self.spec.method == "ngram":
            self.proposer.propose([st.seq for st in verify], [st.num_tokens - 1 for st in verify])
        else:
            self.proposer.propose(batch, verify)
        for st in verify:
            st.num_tokens = 1 + len(st.seq.draft_token_ids)
            if st.num_tokens == 1:
                st.kind = "D"

    def _run_and_sample(self, batch: ScheduledBatch) -> dict[int, list[SampleResult]]:
        """Forward the step and pick each stage's new tokens: one sampled token for a stage that
        reaches its sequence's end, the verified tokens for a verify stage."""
        inputs = []
        for st in batch.stages:
            seq = st.seq
            toks = seq.token_ids[st.start : st.start + st.num_tokens]
            if st.kind == "V":
                toks = toks + seq.draft_token_ids
            reaches_end = st.start + st.num_tokens >= seq.num_tokens
            inputs.append(StageInput(seq, st.start, toks, st.num_tokens if st.kind == "V" else int(reaches_end)))
        logits = self.runner.forward(inputs)
        out: dict[int, list[SampleResult]] = {}
        plain: list[Sequence] = []
        plain_rows: list[int] = []
        row = 0
        for inp, st in zip(inputs, batch.stages):
            if st.kind == "V":
                toks = verify_drafts(self.runner.backend, logits[row : row + inp.num_logits], st.seq)
                out[st.seq.seq_id] = [SampleResult(t, 0.0, None) for t in toks]
                m = st.seq.metrics
                m.num_draft_tokens += st.num_tokens - 1
                m.num_accepted_tokens += len(toks) - 1
                m.num_verify_steps += 1
                self.num_draft_tokens += st.num_tokens - 1
                self.num_accepted_tokens += len(toks) - 1
            elif inp.num_logits:
                plain.append(st.seq)
                plain_rows.append(row)
            row += inp.num_logits
        if plain:
            # every row sampled in order (a decode batch): skip a copy of the [N, vocab] logits
            rows = logits if plain_rows == list(range(logits.shape[0])) else logits[plain_rows]
            results = sample(self.runner.backend, rows, plain, self.eos_ids)
            for seq, res in zip(plain, results):
                out[seq.seq_id] = [res]
        return out

    def _append(self, seq: Sequence, res: SampleResult, now: float) -> None:
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

    def num_spec_tokens(self, seq: Sequence) -> int:
        """How many drafts ``seq`` may verify next step: 0 when not speculating or when its
        sampling needs per-token state (penalties, min_tokens, logprobs); never more than the
        tokens it may still emit minus the one the target adds."""
        if self.spec is None:
            return 0
        p = seq.params
        if (
            p.logprobs is not None
            or p.repetition_penalty != 1.0
            or p.presence_penalty
            or p.frequency_penalty
            or seq.num_output_tokens < p.min_tokens
        ):
            return 0
        left = self.max_model_len - seq.num_tokens
        if p.max_tokens is not None:
            left = min(left, p.max_tokens - seq.num_output_tokens)
        return max(0, min(self.spec.num_speculative_tokens, left - 1))

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
