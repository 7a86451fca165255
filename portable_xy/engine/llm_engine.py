"""The engine core: requests in, one scheduled step at a time, finished outputs out.

``LLMEngine.from_config`` builds every part from one :class:`~portable_xy.config.EngineConfig`;
front ends (``LLM``, and any other) add requests and call :meth:`LLMEngine.step`. A step is
schedule -> propose -> run -> sample -> postprocess, one call each.
"""

from __future__ import annotations

import time

import torch

from ..config import EngineConfig
from ..models.loader import load_tokenizer
from ..outputs import RequestMetrics, RequestOutput
from ..sampling_params import SamplingParams
from ..spec_decode import Proposer, make_proposer
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .sampler import Sampler, SampleResult
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Request, Sequence


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        block_manager: BlockManager,
        scheduler: Scheduler,
        proposer: Proposer,
        tokenizer,
    ) -> None:
        self.config = config
        self.runner = runner
        self.bm = block_manager
        self.scheduler = scheduler
        self.proposer = proposer
        self.tokenizer = tokenizer
        eos = set(config.model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self.sampler = Sampler(runner.backend, self.eos_ids)
        self.output = OutputProcessor(tokenizer, self.eos_ids, config.max_model_len)
        self.rng = torch.Generator().manual_seed(config.seed)
        self.requests: dict[str, Request] = {}
        self._next_seq_id = 0
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """The model runner (weights, KV cache, graphs), the block manager over its KV blocks, the
        scheduler, the proposer and the tokenizer, all from ``config``."""
        runner = ModelRunner(config)
        bm = BlockManager(runner.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                          config.enable_token_wise_reuse)  # fmt: skip
        scheduler = Scheduler(bm, config.scheduler_config)
        tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model_path, config.tokenizer)
        return cls(config, runner, bm, scheduler, make_proposer(config, runner), tokenizer)

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
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the requests that finished in it."""
        batch = self.scheduler.schedule()
        if not batch.stages:
            return []
        self.propose(batch)
        logits = self.runner.execute(batch)
        new_tokens = self.sampler(batch, logits)
        return self.postprocess(batch, new_tokens)

    def propose(self, batch: ScheduledBatch) -> None:
        """Drafts for the step's verify stages; a stage that got fewer drafts than the room it
        reserved shrinks (to a plain decode when it got none)."""
        self.proposer.copy_blocks(batch.block_copies)
        verify = batch.verify_stages
        self.proposer.propose(batch, verify)
        for st in verify:
            st.num_tokens = 1 + len(st.seq.draft_token_ids)
            if st.num_tokens == 1:
                st.kind = "D"

    def postprocess(self, batch: ScheduledBatch, new_tokens: dict[int, list[SampleResult]]) -> list[RequestOutput]:
        """Advance the scheduler past the step (a verify stage keeps only its accepted drafts),
        append the new tokens, finish sequences that stopped; the outputs of finished requests."""
        verify = batch.verify_stages
        rejected = {st.seq.seq_id: st.num_tokens - len(new_tokens[st.seq.seq_id]) for st in verify}
        for st in verify:
            drafts, accepted = st.num_tokens - 1, len(new_tokens[st.seq.seq_id]) - 1
            m = st.seq.metrics
            m.num_draft_tokens += drafts
            m.num_accepted_tokens += accepted
            m.num_verify_steps += 1
            self.num_draft_tokens += drafts
            self.num_accepted_tokens += accepted
        self.scheduler.postprocess(batch, rejected)
        now = time.time()
        done: list[RequestOutput] = []
        for st in batch.stages:
            seq = st.seq
            seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)
            seq.draft_token_ids, seq.draft_probs = [], None
            self.num_generated_tokens += self.output.append(seq, new_tokens.get(seq.seq_id, []), now)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                req = self.requests[seq.request_id]
                if req.finished:
                    seq.metrics.finished_time = now
                    done.append(self.output.make_output(self.requests.pop(seq.request_id)))
        self.num_steps += 1
        return done
