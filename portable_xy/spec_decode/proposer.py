"""The proposer interface every speculative-decoding method implements, and the no-op one used
when speculation is off."""

from __future__ import annotations

from ..engine.scheduler import ScheduledBatch, Stage


class Proposer:
    """Drafts tokens for a step's verify stages. The engine calls :meth:`copy_blocks` with the
    step's KV block copies, then :meth:`propose` with the step and its verify stages, before the
    target model runs."""

    def propose(self, batch: ScheduledBatch, stages: list[Stage]) -> None:
        """Set ``draft_token_ids`` (at most ``num_tokens - 1`` per stage) and ``draft_probs`` (the
        draft distributions ``[k, V]``, or None for a deterministic proposal) of each stage's
        sequence. ``batch`` is the whole step (a draft model mirrors its prefill chunks)."""

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Mirror the step's KV block copies ``src -> dst`` in the proposer's own KV cache, if it has one."""
