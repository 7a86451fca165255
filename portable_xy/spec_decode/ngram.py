"""N-gram prompt-lookup proposer: continue the sequence the way its own prompt + output did after
the most recent earlier occurrence of its last n tokens (longest n first)."""

from __future__ import annotations

import torch

from ..engine.scheduler import ScheduledBatch, Stage
from .proposer import Proposer


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
    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max

    def propose(self, batch: ScheduledBatch, stages: list[Stage]) -> None:
        for st in stages:
            seq = st.seq
            seq.draft_token_ids = ngram_propose(seq.token_ids, st.num_tokens - 1, self.n_min, self.n_max)
            seq.draft_probs = None  # a deterministic proposal: q is one-hot
