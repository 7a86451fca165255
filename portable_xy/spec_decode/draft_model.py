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
from ..engine.proposer import Proposer
from ..engine.rejection import draw, greedy_tokens, seq_probs
from ..engine.scheduler import Draft, SchedulerOutput
from ..engine.sequence import Sequence
from ..models.loader import load_model_config, resolve_model_path

if TYPE_CHECKING:
    from ..config import EngineConfig


class DraftModelProposer(Proposer):
    """Runs ``speculative_config.model`` beside ``target`` (same backend, same block layout)."""

    @classmethod
    def from_config(cls, config: EngineConfig, target: ModelRunner) -> DraftModelProposer:
        return cls(config, target)

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
        self.num_computed: dict[int, int] = {}  # seq_id -> tokens in the draft model's KV cache

    def copy_blocks(self, pairs: tuple[tuple[int, int], ...]) -> None:
        self.runner.copy_blocks(list(pairs))

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

    def propose(self, verify: list[tuple[Sequence, int]], out: SchedulerOutput | None) -> dict[int, Draft]:
        """Exactly ``k`` drafts per ``(sequence, k)`` of the step's verify stages (see
        :class:`Proposer`), keeping the draft cache in step with ``out``'s prefills."""
        done = self.num_computed
        for sid in out.preempted_seq_ids | out.finished_seq_ids:  # their blocks were given back
            done.pop(sid, None)
        for seq in out.seqs:  # rejected drafts left K/V past the target's computed tokens
            done[seq.seq_id] = min(done.get(seq.seq_id, 0), seq.num_computed_tokens)
        inputs = []
        for st in out.stages:
            if st.kind == "P":
                inputs.append(StageInput(st.seq, st.start, st.seq.token_ids[st.start : st.start + st.num_tokens], 0))
        seqs = [seq for seq, _ in verify]
        wants = [k for _, k in verify]
        for seq in seqs:
            start = min(done.get(seq.seq_id, 0), seq.num_tokens - 1)
            inputs.append(StageInput(seq, start, seq.token_ids[start:], 1))
        if not inputs:
            return {}
        logits = self.runner.forward(inputs)
        for st in out.stages:
            if st.kind == "P":
                done[st.seq.seq_id] = st.start + st.num_tokens
        if not seqs:
            return {}
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
        result = {}
        for seq, d, q in zip(seqs, drafts, probs):
            result[seq.seq_id] = Draft(d, None if q[0] is None else torch.stack(q))
            done[seq.seq_id] = seq.num_tokens + len(d) - 1
        return result
