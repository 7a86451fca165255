"""Token sampling: greedy argmax, or temperature + top-k + top-p + min-p by inverse CDF.

Torch reference: ``portable_xy.backends.reference.sample_ref`` (semantics of ``Backend.sample``). Per
row, with ``p = softmax(logits / T)``:

* ``T <= 0``: ``argmax(logits)`` (first index among equal maxima).
* keep the top-k tokens (``0 < k < V``), then the smallest prefix (descending probability) whose
  mass *before* each token is ``< top_p * mass(top-k)``, then tokens with ``p >= min_p * max(p)``;
* draw by inverse CDF over the kept tokens in descending-probability order, ties by lower id:
  the first token whose cumulative mass exceeds ``uniform * mass(kept)``.

No sort: threshold search on probability *values*
    For ``p >= 0`` the IEEE-754 bit pattern, read as int32, orders exactly like the value, so a
    bisection over int32 bit patterns finds any threshold *exactly* in <= 31 passes over the row:

    * top-k:  the largest bit pattern ``t`` with ``count(p >= t) >= k`` (the k-th largest value);
    * top-p:  the smallest ``t`` with ``mass(p > t, within top-k) < top_p * mass(top-k)``: the kept
      set ``{p >= t}`` is then exactly the reference's prefix (its "mass before" is the mass of
      strictly larger values), because that mass is non-increasing in ``t``;
    * min-p:  ``t = bits(min_p * max(p))``;
    * draw:   with ``target = uniform * mass(kept)``, the largest ``t`` with ``mass(p >= t) > target``
      is the value ``v*`` of the drawn token; inside the group of tokens equal to ``v*`` the
      ``j = floor((target - mass(p > v*)) / v*)``-th lowest id is taken (a bisection over ids when
      ``j > 0``), which reproduces the reference's stable order for ties.

    Every pass recomputes ``p`` from the logits (the same arithmetic, so the same bits) instead of
    writing a probability buffer. Cost: O(V) per pass and about 3 x 31 passes per row when top-k,
    top-p and sampling are all active -- fine for decode batches, one program per row.

Where it can differ from the reference
    * exact probability ties at the top-k or top-p cut: all tied tokens are kept (the reference
      keeps the first ones of its sort/topk order);
    * masses are tree-reduced in fp32, the reference uses a sequential cumsum: a decision exactly
      at a rounding boundary (``|mass - target|`` within a few ulp) can go the other way;
    * ``p`` itself can differ from torch's softmax by an ulp (different exp and summation order);
      the order of tokens is the same, since both are monotone in the logit.

Shapes and layouts
    logits [N, V] fp32 (row stride arbitrary, unit column stride); temperature, top_p, min_p,
    uniform [N] fp32; top_k [N] int32 (<= 0 = off); returns int64 [N].

Constexprs: BLOCK_V (vocabulary chunk per pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch_options, support_programs


@triton.jit
def _block_probs(row_ptr, v0, V, temp, xmax, z, BLOCK_V: tl.constexpr):
    """(probabilities, ids) of one vocabulary chunk; -1 outside the vocabulary, so that no
    threshold (all >= 0) ever selects a padding lane."""
    offs = v0 + tl.arange(0, BLOCK_V)
    mask = offs < V
    logit = tl.load(row_ptr + offs, mask=mask, other=float("-inf"))
    p = tl.where(mask, tl.exp(logit / temp - xmax) / z, -1.0)
    return p, offs


# The searches run over int32 bit patterns ``t``; the passes compare the probabilities with the
# float ``t`` stands for (the same order for non-negative floats), since fp32 compares vectorise
# everywhere (Ascend turns int32 vector compares into scalar code).


@triton.jit
def _count_ge(row_ptr, V, temp, xmax, z, t, BLOCK_V: tl.constexpr):
    tf = t.to(tl.float32, bitcast=True)
    n = tl.zeros((BLOCK_V,), dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        p, offs = _block_probs(row_ptr, v0, V, temp, xmax, z, BLOCK_V)
        n += (p >= tf).to(tl.int32)
    return tl.sum(n, axis=0)


@triton.jit
def _mass_ge(row_ptr, V, temp, xmax, z, t, BLOCK_V: tl.constexpr):
    tf = t.to(tl.float32, bitcast=True)
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        p, offs = _block_probs(row_ptr, v0, V, temp, xmax, z, BLOCK_V)
        acc += tl.where(p >= tf, p, 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _group_stats(row_ptr, V, temp, xmax, z, t, BLOCK_V: tl.constexpr):
    """Smallest probability >= bits t present in the row (as bits), how many tokens have it, and
    the lowest such id."""
    tf = t.to(tl.float32, bitcast=True)
    vmin = tl.full((BLOCK_V,), float("inf"), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        p, offs = _block_probs(row_ptr, v0, V, temp, xmax, z, BLOCK_V)
        vmin = tl.minimum(vmin, tl.where(p >= tf, p, float("inf")))
    vstar = tl.min(vmin, axis=0)
    cnt = tl.zeros((BLOCK_V,), dtype=tl.int32)
    first = tl.full((BLOCK_V,), 2147483647, dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        p, offs = _block_probs(row_ptr, v0, V, temp, xmax, z, BLOCK_V)
        hit = p == vstar
        cnt += hit.to(tl.int32)
        first = tl.minimum(first, tl.where(hit, offs, 2147483647))
    return vstar.to(tl.int32, bitcast=True), tl.sum(cnt, axis=0), tl.min(first, axis=0)


@triton.jit
def _count_eq_upto(row_ptr, V, temp, xmax, z, vstar, last, BLOCK_V: tl.constexpr):
    vf = vstar.to(tl.float32, bitcast=True)
    n = tl.zeros((BLOCK_V,), dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        p, offs = _block_probs(row_ptr, v0, V, temp, xmax, z, BLOCK_V)
        n += ((p == vf) & (offs <= last)).to(tl.int32)
    return tl.sum(n, axis=0)


@triton.jit
def _argmax(row_ptr, V, BLOCK_V: tl.constexpr):
    best = tl.load(row_ptr)
    best_i = tl.zeros((), dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        logit = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
        m = tl.max(logit, axis=0)
        i = tl.min(tl.where(logit == m, offs, 2147483647), axis=0)
        take = m > best
        best_i = tl.where(take, i, best_i)
        best = tl.where(take, m, best)
    return best_i


@triton.jit
def _sample_row(row_ptr, V, temp, top_k, top_p, min_p, u, BLOCK_V: tl.constexpr):
    # softmax statistics of x = logits / temp
    mx = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mx = tl.maximum(mx, tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")) / temp)
    xmax = tl.max(mx, axis=0)
    zacc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        logit = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
        zacc += tl.exp(logit / temp - xmax)
    z = tl.sum(zacc, axis=0)
    pmax = 1.0 / z  # p of the largest logit: exp(0) / z, bit-identical to _block_probs
    top = pmax.to(tl.int32, bitcast=True)

    # top-k: largest t with count(p >= t) >= k
    thr = tl.zeros((), dtype=tl.int32)
    if (top_k > 0) & (top_k < V):
        lo = tl.zeros((), dtype=tl.int32)
        hi = top
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            if _count_ge(row_ptr, V, temp, xmax, z, mid, BLOCK_V) >= top_k:
                lo = mid
            else:
                hi = mid - 1
        thr = lo
    # top-p: smallest t >= thr with mass(p > t) < top_p * mass(p >= thr)
    if top_p < 1.0:
        goal = top_p * _mass_ge(row_ptr, V, temp, xmax, z, thr, BLOCK_V)
        lo = thr
        hi = top
        while lo < hi:
            mid = lo + (hi - lo) // 2
            if _mass_ge(row_ptr, V, temp, xmax, z, mid + 1, BLOCK_V) < goal:
                hi = mid
            else:
                lo = mid + 1
        thr = lo
    # min-p
    if min_p > 0.0:
        thr = tl.maximum(thr, (min_p * pmax).to(tl.int32, bitcast=True))

    # inverse CDF: the value v* of the drawn token is the largest t with mass(p >= t) > target
    target = u * _mass_ge(row_ptr, V, temp, xmax, z, thr, BLOCK_V)
    lo = thr
    hi = top
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        if _mass_ge(row_ptr, V, temp, xmax, z, mid, BLOCK_V) > target:
            lo = mid
        else:
            hi = mid - 1
    # lo is v* (or, if u * mass rounded up to the whole mass, thr: then the last kept token)
    vstar, cnt, tok = _group_stats(row_ptr, V, temp, xmax, z, lo, BLOCK_V)
    before = _mass_ge(row_ptr, V, temp, xmax, z, vstar + 1, BLOCK_V)
    jf = (target - before) / vstar.to(tl.float32, bitcast=True)
    jf = tl.minimum(tl.maximum(jf, 0.0), (cnt - 1).to(tl.float32))
    j = jf.to(tl.int32)
    if j > 0:  # tie group: the j-th lowest id among the tokens equal to v*
        lo = tok
        hi = V - 1
        while lo < hi:
            mid = lo + (hi - lo) // 2
            if _count_eq_upto(row_ptr, V, temp, xmax, z, vstar, mid, BLOCK_V) > j:
                hi = mid
            else:
                lo = mid + 1
        tok = lo
    return tok


@triton.jit
def sample_kernel(
    logits_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr, u_ptr, out_ptr,
    N, V, stride_l, num_programs, BLOCK_V: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    for row in tl.range(pid, N, num_programs):
        row_ptr = logits_ptr + tl.cast(row, tl.int64) * stride_l
        temp = tl.load(temp_ptr + row)
        tok = tl.zeros((), dtype=tl.int32)
        if temp <= 0.0:
            tok = _argmax(row_ptr, V, BLOCK_V)
        else:
            tok = _sample_row(row_ptr, V, temp, tl.load(topk_ptr + row), tl.load(topp_ptr + row),
                              tl.load(minp_ptr + row), tl.load(u_ptr + row), BLOCK_V)  # fmt: skip
        tl.store(out_ptr + row, tok.to(tl.int64))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    uniform: torch.Tensor,
    profile=None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``Backend.sample``: one int64 token per row of ``logits [N, V]``."""
    N, V = logits.shape
    if out is None:
        out = torch.empty(N, dtype=torch.long, device=logits.device)
    elif out.shape != (N,) or out.dtype != torch.long:
        raise ValueError(f"sample: out must be int64 [{N}]")
    if N == 0:
        return out
    dev = logits.device

    def prep(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if t.shape != (N,):
            raise ValueError(f"sample: per-row parameter of shape {tuple(t.shape)}, expected ({N},)")
        return t.to(device=dev, dtype=dtype).contiguous()

    if logits.dtype != torch.float32 or logits.stride(-1) != 1:
        logits = logits.float().contiguous()
    temperature, top_p, min_p, uniform = (prep(t, torch.float32) for t in (temperature, top_p, min_p, uniform))
    top_k = prep(top_k, torch.int32)
    s = (profile.data.get("sampling") or {}) if profile is not None else {}
    block_v = min(triton.next_power_of_2(V), int(s.get("block_v", 4096)))
    progs = support_programs(N, profile) if profile is not None else N
    sample_kernel[(progs,)](
        logits, temperature, top_k, top_p, min_p, uniform, out, N, V, logits.stride(0), progs,
        BLOCK_V=block_v, **(launch_options(profile, "sampling") if profile is not None else {}),
    )  # fmt: skip
    return out
