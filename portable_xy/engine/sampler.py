"""Turns the step's logits into tokens: penalties, min_tokens, logprobs, then the backend's
sampling op (greedy / temperature with top-k, top-p, min-p) fed with per-sequence random numbers;
verify stages keep the drafts the target model accepts (``engine/rejection.py``). Prefill
chunks of ``prompt_logprobs`` requests also get their prompt tokens' logprobs, reduced to the top-k
per position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import Backend
from .rejection import verify_drafts
from .scheduler import SchedulerOutput
from .sequence import Sequence


@dataclass
class SampleResult:
    token_id: int
    logprob: float  # raw log-probability of the sampled token (0.0 when logprobs were not asked)
    top: list[tuple[int, float, int]] | None  # (token id, logprob, rank) of the top alternatives


def _apply_penalties(logits: torch.Tensor, seq: Sequence) -> None:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


# rows per log_softmax in prompt_logprobs: bounds the fp32 temporaries of a long prefill chunk
PROMPT_LOGPROB_ROWS = 256


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[list[tuple[int, float, int]]]:
    """Per row ``i`` of the raw logits ``[N, V]``: ``(targets[i], its logprob, its rank)`` then the
    top-``k`` ``(token id, logprob, rank)`` other than ``targets[i]`` (``k=-1``: the whole
    vocabulary), from the fp32 log_softmax; ranks as :func:`sample`'s (1 + the tokens more likely)."""
    vocab = logits.shape[-1]
    k = vocab if k < 0 else min(k, vocab)
    out: list[list[tuple[int, float, int]]] = []
    for a in range(0, len(targets), PROMPT_LOGPROB_ROWS):
        tgt = targets[a : a + PROMPT_LOGPROB_ROWS]
        lp = torch.log_softmax(logits[a : a + len(tgt)].float(), dim=-1)
        tok_lp = lp.gather(1, torch.tensor(tgt, dtype=torch.long, device=lp.device)[:, None])
        ranks = ((lp > tok_lp).sum(-1) + 1).tolist()
        tok_lps = tok_lp[:, 0].tolist()
        vals, idx = torch.topk(lp, k, dim=-1) if k else (None, None)
        del lp
        vals = vals.tolist() if k else [[]] * len(tgt)
        idx = idx.tolist() if k else [[]] * len(tgt)
        for t, tl, rank, vs, ids in zip(tgt, tok_lps, ranks, vals, idx):
            out.append([(t, tl, rank)] + [(i, v, r) for r, (v, i) in enumerate(zip(vs, ids), 1) if i != t])
    return out


def sample(backend: Backend, logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> list[SampleResult]:
    """One token per row of ``logits [N, V]`` (fp32), row ``i`` belonging to ``seqs[i]``."""
    n = len(seqs)
    want_lp = [s.params.logprobs for s in seqs]
    raw_lp = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_lp) else None
    processed = logits
    for i, seq in enumerate(seqs):
        p = seq.params
        needs_min = seq.num_output_tokens < p.min_tokens
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or needs_min:
            if processed is logits:
                processed = logits.clone()
            _apply_penalties(processed[i], seq)
            if needs_min:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else eos_ids)
                processed[i, banned] = float("-inf")
    dev = logits.device
    temperature = torch.tensor([0.0 if s.params.greedy else s.params.temperature for s in seqs], device=dev)
    top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.long, device=dev)
    top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=dev)
    min_p = torch.tensor([s.params.min_p for s in seqs], dtype=torch.float32, device=dev)
    uniform = torch.zeros(n, dtype=torch.float32)
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            uniform[i] = torch.rand((), generator=seq.generator)
    tokens = backend.sample(processed, temperature, top_k, top_p, min_p, uniform.to(dev)).tolist()
    results = []
    for i, tok in enumerate(tokens):
        lp, top = 0.0, None
        if raw_lp is not None and want_lp[i] is not None:
            row = raw_lp[i]
            lp = float(row[tok])
            rank = int((row > row[tok]).sum()) + 1
            top = [(tok, lp, rank)]
            if want_lp[i] > 0:
                vals, idx = torch.topk(row, want_lp[i])
                top += [(int(t), float(v), r + 1) for r, (v, t) in enumerate(zip(vals, idx)) if int(t) != tok]
        results.append(SampleResult(tok, lp, top))
    return results


class Sampler:
    """The step's new tokens from its logits (rows as :meth:`ModelRunner.execute` returns them)."""

    def __init__(self, backend: Backend, eos_ids: list[int]) -> None:
        self.backend = backend
        self.eos_ids = eos_ids

    def __call__(self, batch: SchedulerOutput, logits: torch.Tensor) -> dict[int, list[SampleResult]]:
        """``{seq_id: tokens}``: one sampled token for a stage that reaches its sequence's end, the
        accepted drafts plus the target's next token for a verify stage."""
        out: dict[int, list[SampleResult]] = {}
        plain: list[Sequence] = []
        plain_rows: list[int] = []
        row = 0
        for st in batch.stages:
            n = st.num_logits
            if st.kind == "V":
                toks = verify_drafts(self.backend, logits[row : row + n], st.seq)
                out[st.seq.seq_id] = [SampleResult(t, 0.0, None) for t in toks]
            elif st.samples:
                plain.append(st.seq)
                plain_rows.append(row + n - 1)  # the stage's last row (before it: prompt-logprob rows)
            row += n
        if plain:
            # every row sampled in order (a decode batch): skip a copy of the [N, vocab] logits
            rows = logits if plain_rows == list(range(logits.shape[0])) else logits[plain_rows]
            for seq, res in zip(plain, sample(self.backend, rows, plain, self.eos_ids)):
                out[seq.seq_id] = [res]
        return out

    def prompt_logprobs(
        self, batch: SchedulerOutput, logits: torch.Tensor
    ) -> dict[int, tuple[int, list[list[tuple[int, float, int]]]]]:
        """``{seq_id: (first prompt position scored, per position (token id, logprob, rank) of the
        prompt token then the top-k)}`` for the step's prefill chunks that score prompt tokens."""
        out = {}
        row = 0
        for st in batch.stages:
            pos = st.prompt_logprob_positions
            if pos:
                seq = st.seq
                targets = seq.token_ids[pos.start + 1 : pos.stop + 1]
                out[seq.seq_id] = (pos.start + 1, prompt_logprobs(logits[row : row + len(pos)], targets,
                                                                  seq.params.prompt_logprobs))  # fmt: skip
            row += st.num_logits
        return out
