"""The engine core: requests in, one scheduled step at a time, outputs out.

``LLMEngine.from_config`` builds every part from one :class:`~portable_xy.config.EngineConfig`;
front ends (``LLM``, ``AsyncLLM``) add requests and call :meth:`LLMEngine.step`. A step is: drafts
proposed from the tokens alone (n-gram), the scheduler's immutable ``SchedulerOutput``, the run
(drafts of a proposer that needs the step's blocks, forward pass, sampling), then the scheduler's
``update_from_output`` and the output processor. A step that raises fails the
requests it ran (their blocks are freed) and nothing else: :class:`EngineStepError`.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from ..config import EngineConfig
from ..models.loader import load_tokenizer
from ..outputs import RequestMetrics, RequestOutput
from ..sampling_params import RequestOutputKind, SamplingParams
from .block_manager import BlockManager
from .input_processor import InputProcessor
from .model_runner import ModelRunner, serve_rank
from .output_processor import OutputProcessor
from .proposer import Proposer, make_proposer
from .sampler import Sampler, SampleResult
from .scheduler import Draft, Scheduler, SchedulerOutput
from .sequence import Request, Sequence


def _stop_group(runner: ModelRunner, executor) -> None:
    runner.shutdown()
    executor.shutdown()


class EngineStepError(RuntimeError):
    """A step raised: its requests (``request_ids``) were aborted and their blocks freed; the
    engine and every other request carry on."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed ({type(cause).__name__}: {cause}); aborted requests {request_ids}")
        self.request_ids = request_ids
        self.cause = cause


@dataclass
class StepStats:
    """What one step did, for metrics: tokens, latencies of the tokens it emitted (seconds), and
    the requests it finished (``(finish_reason, e2e latency, prompt tokens, generated tokens)``)."""

    num_scheduled_tokens: int = 0  # tokens the step ran through the model
    num_prompt_tokens: int = 0  # prompts of requests whose first token came in this step
    num_generation_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[tuple[str, float, int, int]] = field(default_factory=list)
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


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
        lock = threading.Lock()  # one thread at a time in the tokenizer (front ends encode, steps decode)
        self.inputs = InputProcessor(tokenizer, config.model_config.vocab_size, config.max_model_len, lock)
        self.sampler = Sampler(runner.backend, self.eos_ids)
        self.output = OutputProcessor(tokenizer, self.eos_ids, config.max_model_len, lock)
        self.rng = torch.Generator().manual_seed(config.seed)
        self.requests: dict[str, Request] = {}
        self._next_seq_id = 0
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.last_step = StepStats()
        self._finalizer: weakref.finalize | None = None

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """The model runner (weights, KV cache, graphs), the block manager over its KV blocks, the
        scheduler, the proposer and the tokenizer, all from ``config``."""
        executor = None
        if config.tensor_parallel_size > 1:
            from ..distributed.executor import TPExecutor

            executor = TPExecutor(config, serve_rank)  # under torchrun, ranks > 0 serve inside and never return
        try:
            runner = ModelRunner(config, group=executor.group if executor else None)
            bm = BlockManager(runner.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                              config.enable_token_wise_reuse)  # fmt: skip
            scheduler = Scheduler(bm, config.scheduler_config)
            tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.model_path, config.tokenizer)
            engine = cls(config, runner, bm, scheduler, make_proposer(config, runner), tokenizer)
        except BaseException as e:
            if executor is None:
                raise
            failed = executor.worker_failures(wait_s=1.0) if isinstance(e, Exception) else []
            if failed:  # a worker's own error explains rank 0's failed collective
                raise executor.diagnose(e) from e
            executor.shutdown(wait_s=0.0)
            raise
        if executor is not None:  # on shutdown(), garbage collection or interpreter exit
            engine._finalizer = weakref.finalize(engine, _stop_group, runner, executor)
        return engine

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (the engine runs no more steps after it).
        Also done when the engine is garbage-collected and at interpreter exit."""
        if self._finalizer is not None:
            self._finalizer()

    def collective_rpc(self, method, args: tuple = ()) -> list:
        """``method(*args)`` on the model runner of every rank (see :meth:`ModelRunner.collective_rpc`)."""
        return self.runner.collective_rpc(method, args)

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

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its blocks. Returns its last output (unfinished completions get
        ``finish_reason="abort"``), or None when the request is not (or no longer) in the engine."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.abort(seq)
                seq.finish_reason = "abort"
        return self.output.make_output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return self.scheduler.stats().num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.stats().num_waiting

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step. Returns the outputs it produced: every request that finished, and those
        of the running ones whose ``output_kind`` is not ``FINAL_ONLY`` and that got tokens."""
        out = self.scheduler.schedule(self.propose_ahead())
        if not out.stages:
            return []
        try:
            return self.postprocess(out, *self.run(out))
        except Exception as e:
            raise self._fail(out, e) from e

    def propose_ahead(self) -> dict[int, Draft] | None:
        """Drafts made before scheduling (by a proposer that drafts from the tokens alone), else None."""
        if not self.proposer.drafts_ahead:
            return None
        return self.proposer.propose(self.scheduler.spec_candidates(), None)

    def run(self, out: SchedulerOutput) -> tuple[dict[int, list[SampleResult]], dict]:
        """The step's drafts (a proposer that drafts inside the step), forward pass and sampling:
        ``({seq_id: emitted tokens}, {seq_id: prompt logprobs})``."""
        self.proposer.copy_blocks(out.block_copies)
        if not self.proposer.drafts_ahead:
            verify = [(st.seq, st.num_tokens - 1) for st in out.verify_stages]
            self.scheduler.update_draft_token_ids(out, self.proposer.propose(verify, out))
        logits = self.runner.execute(out)
        new_tokens = self.sampler(out, logits)
        prompt_lps = self.sampler.prompt_logprobs(out, logits)
        return new_tokens, prompt_lps  # the [rows, V] logits go now (prompt logprobs: reduced to top-k)

    def _fail(self, out: SchedulerOutput, cause: Exception) -> EngineStepError:
        """Abort the requests of a step that raised."""
        ids = list(dict.fromkeys(seq.request_id for seq in out.seqs))
        for rid in ids:
            self.abort_request(rid)
        return EngineStepError(ids, cause)

    def postprocess(
        self,
        out: SchedulerOutput,
        new_tokens: dict[int, list[SampleResult]],
        prompt_logprobs: dict[int, tuple[int, list]] | None = None,
    ) -> list[RequestOutput]:
        """The scheduler's update from the step (a verify stage keeps only its accepted drafts),
        then the new tokens and prompt logprobs (:meth:`Sampler.prompt_logprobs`) appended and
        stop checks made by the output processor, and finished sequences handed back to the
        scheduler; the step's outputs (see :meth:`step`)."""
        stats = self.last_step = StepStats(num_scheduled_tokens=out.total_tokens)
        accepted = self.scheduler.update_from_output(out, {sid: len(t) for sid, t in new_tokens.items()})
        for st in out.verify_stages:
            drafts, ok = st.num_tokens - 1, accepted[st.seq.seq_id]
            m = st.seq.metrics
            m.num_draft_tokens += drafts
            m.num_accepted_tokens += ok
            m.num_verify_steps += 1
            stats.num_drafts += 1
            stats.num_draft_tokens += drafts
            stats.num_accepted_tokens += ok
        self.num_draft_tokens += stats.num_draft_tokens
        self.num_accepted_tokens += stats.num_accepted_tokens
        now = time.time()
        touched: dict[str, Request] = {}
        for st in out.stages:
            seq = st.seq
            if prompt_logprobs and seq.seq_id in prompt_logprobs:
                self.output.append_prompt_logprobs(seq, *prompt_logprobs[seq.seq_id])
            results = new_tokens.get(seq.seq_id, [])
            if not results:
                continue
            req = touched[seq.request_id] = self.requests[seq.request_id]
            if seq.index == 0:
                m = seq.metrics
                if m.first_token_time is None:
                    stats.ttfts.append(now - m.arrival_time)
                    stats.num_prompt_tokens += len(req.prompt_token_ids)
                else:
                    stats.inter_token_latencies.append(now - m.last_token_time)
            n = self.output.append(seq, results, now)
            stats.num_generation_tokens += n
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
        self.num_generated_tokens += stats.num_generation_tokens
        outputs: list[RequestOutput] = []
        for rid, req in touched.items():
            if req.finished:
                req.metrics.finished_time = now
                del self.requests[rid]
                m = req.metrics
                stats.finished.append((req.seqs[0].finish_reason, now - m.arrival_time, len(req.prompt_token_ids),
                                       sum(s.num_output_tokens for s in req.seqs)))  # fmt: skip
            elif req.params.output_kind == RequestOutputKind.FINAL_ONLY:
                continue
            out = self.output.make_output(req)
            if out is not None:
                outputs.append(out)
        self.num_steps += 1
        return outputs
