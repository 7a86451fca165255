"""N-gram prompt-lookup proposer: continue the sequence the way its own prompt + output did after
the most recent earlier occurrence of its last n tokens (longest n first)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..engine.proposer import Proposer
from ..engine.scheduler import Draft, SchedulerOutput
from ..engine.sequence import Sequence

if TYPE_CHECKING:
    from ..config import EngineConfig
    from ..engine.model_runner import ModelRunner


def ngram_propose(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to ``k`` draft tokens: for n from ``n_max`` down to ``n_min``, find the last earlier
    position where the final n tokens occurred and return the tokens that followed it."""
    length = len(token_ids)
    if k < 1 or length < n_min + 1:
        return []
    toks = torch.tensor(token_ids, dtype=torch.long)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        windows = toks[: length - 1].unfold(0, n, 1)  # every n-gram that is followed by a token
        hits = torch.nonzero((windows == toks[length - n :]).all(1)).flatten()
        if hits.numel():
            j = int(hits[-1]) + n
            return token_ids[j : j + k]
    return []


class NgramProposer(Proposer):
    """Drafts from the tokens alone, before the step is scheduled."""

    drafts_ahead = True

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max

    @classmethod
    def from_config(cls, config: EngineConfig, target: ModelRunner) -> NgramProposer:
        spec = config.speculative_config
        return cls(spec.prompt_lookup_min, spec.prompt_lookup_max)

    def propose(self, seqs: list[tuple[Sequence, int]], out: SchedulerOutput | None) -> dict[int, Draft]:
        drafts = {}
        for seq, k in seqs:
            d = ngram_propose(seq.token_ids, k, self.n_min, self.n_max)
            if d:
                drafts[seq.seq_id] = Draft(d)  # a deterministic proposal: q is one-hot
        return drafts
