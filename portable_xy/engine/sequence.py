"""A request and its generated sequences: tokens, how many are in the KV cache, and blocks.

vLLM V1's contract: no prefill/decode phases. A sequence has ``num_tokens`` (prompt + output so
far) and ``num_computed_tokens`` (already in the KV cache); the scheduler gives it up to
``num_tokens - num_computed_tokens`` tokens a step, and when the cache catches up the step samples
one new token. A speculating sequence also carries ``draft_token_ids``: proposed tokens that the
next step verifies alongside its last sampled token (a Verify stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from ..outputs import Logprob, RequestMetrics
from ..sampling_params import SamplingParams


class SeqStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        generator: torch.Generator | None,
        metrics: RequestMetrics,
        priority: int = 0,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # completion index within its request (0..n-1)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = generator
        self.metrics = metrics
        self.status = SeqStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, Logprob]] = []
        # SamplingParams.prompt_logprobs, collected by the request's first sequence only: entry i for
        # prompt token i (None for the first), filled chunk by chunk as the prompt is computed
        wants_plp = params.prompt_logprobs is not None and index == 0
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = [None] if wants_plp else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""  # detokenized output (kept current only when stop strings need it)
        self.num_preemptions = 0
        self.priority = priority  # lower runs first under the "priority" scheduling policy
        # scheduling state, written by the scheduler (and the block manager) only: status,
        # num_computed_tokens, block_table, num_preemptions above, and the drafts this step verifies
        self.draft_token_ids: list[int] = []
        self.draft_probs: object | None = None  # the proposer's distributions [k, V] (None: one-hot)
        # streaming: the text decoded so far (incrementally: from prefix_offset, new from read_offset)
        # and what the request's outputs have returned (RequestOutputKind.DELTA)
        self.stream_text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.num_sent_tokens = 0
        self.sent_text = ""
        self.finish_sent = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def num_tokens_left(self, max_model_len: int | None) -> int | float:
        """Tokens this sequence may still emit under its ``max_tokens`` and ``max_model_len``."""
        left = float("inf") if max_model_len is None else max_model_len - self.num_tokens
        if self.params.max_tokens is not None:
            left = min(left, self.params.max_tokens - self.num_output_tokens)
        return left

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Prompt logprobs were asked for and some are still missing: the prompt positions from
        ``len(prompt_logprobs) - 1`` on must be computed (not taken from the prefix cache) and
        return their logits."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def in_decode(self) -> bool:
        """Only the last sampled token is missing from the KV cache (the prompt is done)."""
        return self.num_uncomputed_tokens == 1 and self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.name})"
        )


@dataclass
class Request:
    """One request: its prompt and parameters, and the ``n`` sequences it samples."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs_sent: bool = False  # RequestOutputKind.DELTA: returned once, in the first output

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
