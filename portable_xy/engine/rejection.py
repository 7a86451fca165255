"""Lossless verification of draft tokens (speculative sampling, Leviathan et al. / Chen et al.).

Greedy: a draft is accepted while it equals the target's greedy token (the backend's own
sampling op picks the target tokens, so ties break exactly as without speculation). Sampling:
draft ``d_i`` drawn from ``q_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``;
the first rejection resamples from ``normalise(max(p_i - q_i, 0))``; if every draft is accepted a
bonus token is drawn from ``p_k``. ``p`` is the target distribution after temperature, top-k,
top-p and min-p -- the same kept set and probabilities as ``Backend.sample`` -- and all random
numbers come from the sequence's own generator (per-request seeds). The emitted tokens are then
distributed exactly as plain sampling.
"""

from __future__ import annotations

import torch

from ..backends import Backend
from .sequence import Sequence


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Rows of ``logits [R, V]`` -> the sampling distribution ``[R, V]`` (fp32) that
    ``Backend.sample`` draws from: softmax(logits / T) restricted to the top-k, then the smallest
    prefix (by descending probability) whose mass reaches ``top_p`` of the top-k mass, then the
    tokens with at least ``min_p`` times the top probability; renormalised."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    vals, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = torch.ones_like(vals, dtype=torch.bool)
    if 0 < top_k < vals.shape[-1]:
        keep[:, top_k:] = False
    if top_p < 1.0:
        kept = vals * keep
        before = torch.cumsum(kept, -1) - kept
        keep &= before < top_p * kept.sum(-1, keepdim=True)
    if min_p > 0.0:
        keep &= vals >= min_p * vals[:, :1]
    out = torch.zeros_like(probs).scatter_(-1, idx, vals * keep)
    return out / out.sum(-1, keepdim=True)


def seq_probs(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    return filtered_probs(logits, p.temperature, p.top_k, p.top_p, p.min_p)


def draw(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    """Inverse-CDF draw of one token from a (possibly unnormalised) distribution ``[V]``."""
    cdf = torch.cumsum(probs, 0)
    u = float(torch.rand((), generator=gen)) * float(cdf[-1])
    return int(torch.searchsorted(cdf, u, right=True).clamp(max=probs.numel() - 1))


def greedy_tokens(backend: Backend, logits: torch.Tensor) -> list[int]:
    n, dev = logits.shape[0], logits.device
    zeros = torch.zeros(n, device=dev)
    return backend.sample(
        logits, zeros, torch.zeros(n, dtype=torch.long, device=dev), torch.ones(n, device=dev), zeros, zeros
    ).tolist()


def verify_drafts(backend: Backend, logits: torch.Tensor, seq: Sequence) -> list[int]:
    """``logits [k+1, V]`` of the verify rows (last token, then each draft) -> the tokens to append:
    the accepted drafts followed by one token from the target (correction or bonus)."""
    drafts = seq.draft_token_ids
    k = len(drafts)
    if seq.params.greedy:
        target = greedy_tokens(backend, logits)
        a = 0
        while a < k and drafts[a] == target[a]:
            a += 1
        return target[: a + 1]
    p = seq_probs(logits, seq)
    q = seq.draft_probs
    out: list[int] = []
    for i, d in enumerate(drafts):
        q_d = 1.0 if q is None else float(q[i, d])
        p_d = float(p[i, d])
        if float(torch.rand((), generator=seq.generator)) * q_d < p_d:
            out.append(d)
            continue
        residual = p[i].clone()
        if q is None:
            residual[d] = 0.0
        else:
            residual = torch.clamp(residual - q[i].to(residual), min=0.0)
        out.append(draw(residual if float(residual.sum()) > 0 else p[i], seq.generator))
        return out
    out.append(draw(p[k], seq.generator))
    return out
