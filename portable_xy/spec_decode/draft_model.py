"""Draft-model proposer: a smaller model with the target's vocabulary, run by the same engine.

It has its own KV cache with the target's block layout and reads it through the target's block
tables, so blocks, prefix reuse and preemption need no bookkeeping of their own. Each step it
(1) mirrors the step's prefill chunks, (2) catches each verifying sequence up to its last sampled
token and samples a first draft, (3) runs ``k - 1`` one-token steps for the remaining drafts. The
drafts are sampled from the draft model's distribution after the request's own temperature /
top-k / top-p / min-p (greedy for greedy requests), and those distributions are kept for lossless
verification. Draft K/V lags the target by at most the tokens of the last verify step; positions
it misses (e.g. in a prefix shared from a finished request) can only lower acceptance, never
change outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..engine.model_runner import ModelRunner, StageInput
from ..engine.scheduler import ScheduledBatch, Stage
from ..engine.sequence import Sequence
from ..models.loader import load_model_config, resolve_model_path
from .proposer import Proposer
from .rejection import draw, greedy_tokens, seq_probs

if TYPE_CHECKING:
    from ..config import EngineConfig


class DraftModelProposer(Proposer):
    """Runs ``speculative_config.model`` beside ``target`` (same backend, same block layout)."""

    def __init__(self, config: EngineConfig, target: ModelRunner) -> None:
        path = config.speculative_config.model
        model_path = resolve_model_path(path)
        draft = load_model_config(model_path)
        vocab = config.model_config.vocab_size
        if draft.vocab_size != vocab:
            raise ValueError(
                f"speculative_config['model']={path!r} has vocab_size={draft.vocab_size}; the target model has "
                f"{vocab} (a draft model must share the target's vocabulary)"
            )
        if draft.max_position_embeddings < config.max_model_len:
            raise ValueError(
                f"speculative_config['model']={path!r} supports {draft.max_position_embeddings} positions, "
                f"fewer than max_model_len={config.max_model_len}"
            )
        self.backend = target.backend
        self.runner = ModelRunner(config, target.backend, model_path, target.num_kv_blocks)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.runner.copy_blocks(pairs)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[torch.Tensor | None]]:
        tokens: list[int] = []
        probs: list[torch.Tensor | None] = []
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        picked = dict(zip(greedy, greedy_tokens(self.backend, logits[greedy]))) if greedy else {}
        for i, seq in enumerate(seqs):
            if i in picked:
                tokens.append(picked[i])
                probs.append(None)
            else:
                q = seq_probs(logits[i : i + 1], seq)[0]
                tokens.append(draw(q, seq.generator))
                probs.append(q)
        return tokens, probs

    def propose(self, batch: ScheduledBatch, verify: list[Stage]) -> None:
        """Drafts for the ``verify`` stages (see :class:`Proposer`), keeping the draft cache in step
        with ``batch``'s prefills."""
        inputs = []
        for st in batch.stages:
            if st.kind == "P":
                inputs.append(StageInput(st.seq, st.start, st.seq.token_ids[st.start : st.start + st.num_tokens], 0))
        seqs = [st.seq for st in verify]
        wants = [st.num_tokens - 1 for st in verify]
        for seq in seqs:
            start = min(seq.num_draft_computed, seq.num_tokens - 1)
            inputs.append(StageInput(seq, start, seq.token_ids[start:], 1))
        if not inputs:
            return
        logits = self.runner.forward(inputs)
        for st in batch.stages:
            if st.kind == "P":
                st.seq.num_draft_computed = st.start + st.num_tokens
        if not seqs:
            return
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[torch.Tensor | None]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        while True:
            toks, qs = self._sample(logits, [seqs[i] for i in active])
            for i, t, q in zip(active, toks, qs):
                drafts[i].append(t)
                probs[i].append(q)
            active = [i for i in active if len(drafts[i]) < wants[i]]
            if not active:
                break
            steps = []
            for i in active:
                seq = seqs[i]
                steps.append(StageInput(seq, seq.num_tokens + len(drafts[i]) - 1, [drafts[i][-1]], 1))
            logits = self.runner.forward(steps)
        for seq, d, q in zip(seqs, drafts, probs):
            seq.draft_token_ids = d
            seq.draft_probs = None if q[0] is None else torch.stack(q)
            seq.num_draft_computed = seq.num_tokens + len(d) - 1
