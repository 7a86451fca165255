"""Stage 2, kernel correctness on the device against ``backends/reference.py``.

Per dtype (fp32, fp16, bf16; the interpreter has no bf16), on fresh random inputs with every
output poisoned first (NaN, or -1 for integers), so an element a kernel forgets to write fails:

* SmoothGEMM: the backend's planned ``linear`` over M = 1 ... 4096 (every plan segment it picks)
  and every menu tile of the profile alone, at N and K that are not tile multiples;
* Meta-Attention: one launch over a mixed batch (prefill, prefill on a cached prefix, a later
  chunk, decodes, a chain verify, a tree verify), GQA, two head dims; the split-KV decode path;
  the fixed decode-graph plan over varying lengths;
* the support kernels: RMSNorm (with and without residual), RoPE on strided views, SiLU-and-mul,
  the KV store (skipped slots stay untouched), sampling (greedy and top-k / top-p / min-p draws);
* fused MoE: the backend's ``moe_route`` against ``moe_route_ref``; the fused-MoE kernel on the
  backend's ``prepare_experts`` against ``fused_moe_ref`` over several token counts, every token
  on one expert, an expert-parallel slice (``expert_start > 0``) and Q4_0 / Q8_0 experts
  (reference on the dequantized weights).

Tolerances (atol = rtol) against the reference computed in fp32 from the same rounded inputs are
in :data:`TOL`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ...backends import AttnMetadata
from ...backends import reference as ref
from .report import Stage

# (GEMM, attention, elementwise) tolerance per dtype; fp16 / bf16 outputs are rounded to the dtype
TOL = {
    torch.float32: (1e-4, 1e-4, 1e-5),
    torch.float16: (2e-2, 4e-3, 1e-2),
    torch.bfloat16: (8e-2, 3e-2, 4e-2),
}


@dataclasses.dataclass
class Sizes:
    gemm_n: int
    gemm_k: int
    gemm_m: tuple[int, ...]
    tile_m: tuple[int, ...]
    heads: tuple[int, int]  # (query heads, KV heads)
    head_dims: tuple[int, ...]
    scale: int  # stage lengths are multiplied by this
    hidden: int
    vocab: int
    moe: tuple[int, int, int, int] = (6, 2, 96, 32)  # experts, top-k, hidden, intermediate (multiples of 32)
    moe_t: tuple[int, ...] = (1, 17, 300)  # token counts


def sizes(device: torch.device, quick: bool) -> Sizes:
    if device.type == "cpu":  # the interpreter: small shapes
        return Sizes(80, 72, (1, 3, 17, 127), (17,), (4, 2), (32,), 1, 96, 1003)
    if quick:
        return Sizes(1000, 584, (1, 3, 17, 64, 127, 300, 1000, 4096), (1, 300), (16, 2), (64, 128), 4, 4096, 32000,
                     (8, 2, 1024, 352), (1, 7, 64, 300, 4096))  # fmt: skip
    return Sizes(3000, 1096, (1, 2, 3, 7, 8, 16, 17, 31, 33, 64, 65, 127, 128, 129, 255, 256, 300, 511, 512, 1000,
                              1024, 2047, 2048, 4095, 4096), (1, 17, 64, 129, 1000), (32, 8), (64, 128), 16, 8192,
                 152064, (128, 8, 2048, 768), (1, 3, 8, 64, 300, 1000, 4096))  # fmt: skip


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> dict[str, Any]:
    got, want = got.float().cpu(), want.float().cpu()
    if torch.isnan(got).any():
        raise AssertionError(f"{name}: {int(torch.isnan(got).sum())} elements left unwritten (NaN)")
    err = (got - want).abs()
    bound = tol + tol * want.abs()
    bad = int((err > bound).sum())
    if bad:
        raise AssertionError(f"{name}: {bad} of {err.numel()} elements off (max abs err {float(err.max()):.3g}, "
                             f"tol {tol})")  # fmt: skip
    return {"max_abs_err": float(err.max()) if err.numel() else 0.0}


def _nan(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


class KernelChecks:
    def __init__(self, be, stage: Stage, quick: bool, seed: int = 0) -> None:
        self.be, self.stage, self.k, self.prof, self.dev = be, stage, be.k, be.profile, be.device
        self.s = sizes(self.dev, quick)
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=self.g)).to(self.dev, dtype)

    # ---- SmoothGEMM --------------------------------------------------------------------------
    def gemm(self, dtype: torch.dtype) -> None:
        from ...triton_kernels import gemm_plan as gp

        N, K, tol = self.s.gemm_n, self.s.gemm_k, TOL[dtype][0]
        w = self.randn(N, K, scale=1 / math.sqrt(K), dtype=dtype)
        b = self.randn(N, dtype=dtype)
        sg = self.k.smooth_gemm

        def one(M: int, plan=None) -> dict[str, Any]:
            x = self.randn(M, K, dtype=dtype)
            bias = b if M % 2 else None
            if plan is None:
                plan = gp.plan_gemm(M, N, K, self.prof, x.element_size())
            y = sg.smooth_gemm(x, w, bias, self.prof, plan=plan, out=_nan((M, N), dtype, self.dev))
            want = ref.linear_ref(x.float(), w.float(), None if bias is None else bias.float()).to(dtype)
            return {**_close(f"M={M}", y, want, tol), "segments": [f"{s.tile.name}x{s.m_rows}" for s in plan.segments]}

        for M in self.s.gemm_m:
            self.stage.run(f"gemm {_dt(dtype)} planned M={M} N={N} K={K}", one, M)
        for t in gp.menu(self.prof):
            for M in self.s.tile_m:
                plan = gp.single_tile_plan(M, N, K, t, self.prof, torch.tensor([], dtype=dtype).element_size())
                self.stage.run(f"gemm {_dt(dtype)} tile {t.name} M={M}", one, M, plan)

    # ---- Meta-Attention ----------------------------------------------------------------------
    def attend(self, stages, d: int, dtype: torch.dtype, prof=None, plan=None) -> dict[str, Any]:
        from ...triton_kernels import meta_attention as ma

        hq, hkv = self.s.heads
        prof = prof or self.prof
        kc, vc, meta = make_batch(stages, hkv, d, dtype, self.g, self.prof.kv_block_size, self.dev)
        t = int(meta.query_start_loc[-1])
        q = self.randn(t, (hq + 2 * hkv) * d, dtype=dtype)[:, : hq * d].view(t, hq, d)  # a fused-QKV slice
        plan = plan or ma.plan_attention(meta, hq, hkv, prof, d)
        out = ma.meta_attention(q, kc, vc, meta, d**-0.5, plan, out=_nan((t, hq, d), dtype, self.dev))
        want = ref.attention_ref(q, kc, vc, meta, d**-0.5)
        return {**_close("attention", out, want, TOL[dtype][1]), "num_splits": plan.table.num_splits,
                "tiles": sorted(set(plan.table.tile_rows))}  # fmt: skip

    def attention(self, dtype: torch.dtype) -> None:
        from ...triton_kernels import meta_attention as ma

        c = self.s.scale
        tree = tree_mask([-1, 0, 0, 1, 1, 2, 5])
        mixed = [(37 * c, 0, None), (17 * c, 45 * c, None), (20 * c, 64 * c, None), (1, 1, None), (1, 130 * c, None),
                 (4, 29 * c, None), (7, 50 * c, tree)]  # fmt: skip
        causal = [st for st in mixed if st[2] is None]
        split = dataclasses.replace(self.prof, data={**self.prof.data, "num_cores": max(self.prof.num_cores, 16),
            "attention": {**self.prof.attention, "split_kv": {"max_seqs": 64, "num_splits": 4}}})  # fmt: skip
        for d in self.s.head_dims:
            self.stage.run(f"attention {_dt(dtype)} d={d} mixed P/D/V + tree", self.attend, mixed, d, dtype)
            self.stage.run(f"attention {_dt(dtype)} d={d} mixed P/D/V causal", self.attend, causal, d, dtype)

            def split_kv(d=d) -> dict[str, Any]:
                r = self.attend([(1, 300 * c, None), (1, 77 * c, None)], d, dtype, prof=split)
                assert r["num_splits"] > 1, f"the split-KV path was not taken (num_splits={r['num_splits']})"
                return r

            self.stage.run(f"attention {_dt(dtype)} d={d} split-KV decode", split_kv)

            def graph_plan(d=d) -> dict[str, Any]:
                hq, hkv = self.s.heads
                lens = [1 + 97 * c, 5, 64 * c, 1]
                plan = ma.plan_decode_attention(len(lens), 128 * c, hq, hkv, self.prof, self.dev)
                return self.attend([(1, n - 1, None) for n in lens], d, dtype, plan=plan)

            self.stage.run(f"attention {_dt(dtype)} d={d} decode-graph plan", graph_plan)

    # ---- fused MoE ---------------------------------------------------------------------------
    def moe(self, dtype: torch.dtype) -> None:
        from ...backends.quant import dequantize_ref, quantize_ref

        be, tol = self.be, TOL[dtype][0]
        E, k, H, I = self.s.moe  # noqa: E741

        def logits(T: int) -> torch.Tensor:  # experts >= 0.25 apart in every row: top-k is unambiguous
            ranks = torch.argsort(torch.rand(T, E, generator=self.g), dim=1).float()
            return (0.3 * ranks + 0.02 * torch.rand(T, E, generator=self.g)).to(self.dev, dtype)

        w13 = [self.randn(2 * I, H, scale=1 / math.sqrt(H), dtype=dtype) for _ in range(E)]
        w2 = [self.randn(H, I, scale=1 / math.sqrt(I), dtype=dtype) for _ in range(E)]
        s13 = be.prepare_experts([be.prepare_weight(w) for w in w13])
        s2 = be.prepare_experts([be.prepare_weight(w) for w in w2])
        ref13, ref2 = torch.stack(w13).float(), torch.stack(w2).float()

        def one(T: int, ids=None, start: int = 0, experts=(s13, s2, ref13, ref2)) -> dict[str, Any]:
            x = self.randn(T, H, dtype=dtype)
            weights, got_ids = be.moe_route(logits(T), k, True)
            if ids is not None:
                got_ids = ids
            p13, p2, r13, r2 = experts  # the kernel on the backend's prepared experts, into NaNs
            y = self.k.fused_moe.fused_moe(
                x, p13, p2, weights, got_ids, self.prof, start, out=_nan((T, H), dtype, self.dev)
            )
            want = ref.fused_moe_ref(x.float(), r13, r2, weights, got_ids, start).to(dtype)
            return _close(f"T={T}", y, want, tol)

        def route() -> dict[str, Any]:
            for T in (1, 37):
                lg = logits(T)
                w, ids = be.moe_route(lg, k, True)
                want_w, want_ids = ref.moe_route_ref(lg, k, True)
                if not torch.equal(ids.cpu(), want_ids.cpu()):
                    raise AssertionError(f"moe_route T={T}: ids {ids.tolist()} vs reference {want_ids.tolist()}")
                _close("moe_route weights", w, want_w, 1e-5)
            return {}

        self.stage.run(f"moe_route {_dt(dtype)} E={E} k={k}", route)
        for T in self.s.moe_t:
            self.stage.run(f"fused_moe {_dt(dtype)} E={E} k={k} H={H} I={I} T={T}", one, T)
        T = max(self.s.moe_t)
        one_expert = torch.full((T, k), E - 1, dtype=torch.long, device=self.dev)  # all rows on one expert
        self.stage.run(f"fused_moe {_dt(dtype)} T={T} every token on expert {E - 1}", one, T, one_expert)
        half = E // 2  # an expert-parallel rank owning experts half .. E-1
        local = (be.prepare_experts([be.prepare_weight(w) for w in w13[half:]]),
                 be.prepare_experts([be.prepare_weight(w) for w in w2[half:]]), ref13[half:], ref2[half:])  # fmt: skip
        self.stage.run(f"fused_moe {_dt(dtype)} expert parallel (experts {half}..{E - 1})", one, 17, None, half,
                       local)  # fmt: skip
        for qtype in ("q4_0", "q8_0"):
            q13 = [quantize_ref(w.float().cpu(), qtype) for w in w13]
            q2 = [quantize_ref(w.float().cpu(), qtype) for w in w2]
            quant = (be.prepare_experts([be.prepare_quant_weight(q, False) for q in q13]),
                     be.prepare_experts([be.prepare_quant_weight(q, False) for q in q2]),
                     torch.stack([dequantize_ref(q) for q in q13]).to(self.dev),
                     torch.stack([dequantize_ref(q) for q in q2]).to(self.dev))  # fmt: skip
            self.stage.run(f"fused_moe {_dt(dtype)} {qtype} experts T=17", one, 17, None, 0, quant)

    # ---- support kernels ---------------------------------------------------------------------
    def support(self, dtype: torch.dtype) -> None:
        tol, k, prof, dev, H = TOL[dtype][2], self.k, self.prof, self.dev, self.s.hidden

        def norm() -> dict[str, Any]:
            for T in (1, 3, 17, 127):
                x, r = self.randn(T, H, dtype=dtype), self.randn(T, H, dtype=dtype)
                w = (1 + 0.1 * torch.randn(H, generator=self.g)).to(dev, dtype)
                y, _ = k.rms_norm.rms_norm(x, w, 1e-6, None, prof, out=_nan(x.shape, dtype, dev))
                _close("rms_norm", y, ref.rms_norm_ref(x.float(), w.float(), 1e-6)[0].to(dtype), tol)
                y, res = k.rms_norm.rms_norm(x, w, 1e-6, r, prof, out=_nan(x.shape, dtype, dev),
                                             residual_out=_nan(x.shape, dtype, dev))  # fmt: skip
                want, want_res = ref.rms_norm_ref(x, w, 1e-6, r)
                _close("rms_norm residual", res, want_res, tol)
                _close("rms_norm (residual)", y, want, tol)
            return {}

        def rope() -> dict[str, Any]:
            hq, hk, D = 4, 3, 64
            inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
            f = torch.outer(torch.arange(4096).float(), inv)
            cs = torch.cat((f.cos(), f.sin()), dim=-1).to(dev)
            for T in (1, 3, 17, 127):
                qkv = self.randn(T, (hq + 2 * hk) * D, dtype=dtype)
                q, kk = qkv[:, : hq * D].reshape(T, hq, D), qkv[:, hq * D : (hq + hk) * D].reshape(T, hk, D)
                pos = torch.randint(0, 4096, (T,), generator=self.g).to(dev)
                qo, ko = k.rope.rope(q, kk, pos, cs, prof, q_out=_nan((T, hq, D), dtype, dev),
                                     k_out=_nan((T, hk, D), dtype, dev))  # fmt: skip
                q_ref, k_ref = ref.rope_ref(q, kk, pos, cs)
                _close("rope q", qo, q_ref, tol)
                _close("rope k", ko, k_ref, tol)
            return {}

        def silu() -> dict[str, Any]:
            for M in (1, 3, 17, 127):
                x = self.randn(M, 2 * (H + 40), dtype=dtype, scale=3.0)
                y = k.activation.silu_and_mul(x, prof, out=_nan((M, H + 40), dtype, dev))
                _close("silu_and_mul", y, ref.silu_and_mul_ref(x), tol)
            return {}

        def store() -> dict[str, Any]:
            NB, BS, Hh, D = 24, self.prof.kv_block_size, 3, 64
            for T in (1, 3, 17, 127):
                kv = self.randn(T, 3 * Hh * D, dtype=dtype)
                kk, v = kv[:, : Hh * D].reshape(T, Hh, D), kv[:, Hh * D : 2 * Hh * D].reshape(T, Hh, D)
                slots = torch.randperm(NB * BS, generator=self.g)[:T]
                slots[torch.rand(T, generator=self.g) < 0.3] = -1
                slots = slots.to(dev)
                caches = [_nan((NB, BS, Hh, D), dtype, dev) for _ in range(4)]
                k.kv_cache.store_kv(kk, v, caches[0], caches[1], slots, prof)
                ref.store_kv_ref(kk, v, caches[2], caches[3], slots)
                for a, b in ((0, 2), (1, 3)):
                    if not torch.equal(caches[a].nan_to_num(7.0), caches[b].nan_to_num(7.0)):
                        raise AssertionError(f"store_kv T={T}: cache differs from the reference")
            return {}

        def sample() -> dict[str, Any]:
            V = self.s.vocab
            temp = torch.tensor([0.0, 1.0, 0.7, 1.3, 0.9, 0.6, 1.0, 0.0])
            top_k = torch.tensor([0, 0, 20, 0, 0, 40, 1, 0])
            top_p = torch.tensor([1.0, 1.0, 1.0, 0.85, 1.0, 0.9, 1.0, 1.0])
            min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.02, 0.0, 0.0])
            n = len(temp)
            logits = 3 * torch.randn(n, V, generator=self.g)
            logits[:, torch.randint(0, V, (50,), generator=self.g)] = float("-inf")
            u = torch.rand(n, generator=self.g)
            args = [t.to(dev) for t in (logits, temp, top_k, top_p, min_p, u)]
            got = k.sampling.sample(*args, prof, out=torch.full((n,), -1, dtype=torch.long, device=dev))
            want = ref.sample_ref(*args)
            if got.tolist() != want.tolist():
                raise AssertionError(f"sample: {got.tolist()} vs reference {want.tolist()}")
            return {}

        for name, fn in (("rms_norm", norm), ("rope", rope), ("silu_and_mul", silu), ("store_kv", store)):
            self.stage.run(f"{name} {_dt(dtype)}", fn)
        if dtype == torch.float32:
            self.stage.run("sample fp32 logits", sample)


def _dt(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def make_batch(stages, hkv: int, d: int, dtype: torch.dtype, gen: torch.Generator, block_size: int = 16,
               device: torch.device | str = "cpu", tree_offsets: bool = False):  # fmt: skip
    """Paged K/V caches and the token table of one step. ``stages``: ``(q_len, history, tree)``
    with ``tree`` None (causal) or a bool ``[q_len, q_len]`` mask. Every stage's blocks are
    scattered at random over the cache and its unused block-table entries point at a block of
    garbage; ``tree_offsets=True`` attaches (all -1) tree offsets even without a tree stage.
    Returns ``(k_cache, v_cache, meta)`` on ``device``."""
    seq_lens = [q + h for q, h, _ in stages]
    nblk = [-(-n // block_size) for n in seq_lens]
    total = sum(nblk) + 1
    perm = torch.randperm(total, generator=gen).tolist()
    width, used, tables = max(nblk), 0, []
    for n in nblk:
        tables.append(perm[used : used + n] + [perm[-1]] * (width - n))
        used += n
    kc = torch.randn(total, block_size, hkv, d, generator=gen).to(device, dtype)
    vc = torch.randn(total, block_size, hkv, d, generator=gen).to(device, dtype)
    starts = [0]
    for q, _, _ in stages:
        starts.append(starts[-1] + q)
    tree_off = flat = None
    if tree_offsets or any(t is not None for _, _, t in stages):
        tree_off, flat, off = [], [torch.zeros(0, dtype=torch.int8)], 0
        for q, _, t in stages:
            tree_off.append(-1 if t is None else off)
            if t is not None:
                flat.append(t.to(torch.int8).flatten())
                off += q * q
    i32 = dict(dtype=torch.int32, device=device)
    meta = AttnMetadata(
        query_start_loc=torch.tensor(starts, **i32), seq_lens=torch.tensor(seq_lens, **i32),
        block_tables=torch.tensor(tables, **i32),
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long, device=device),
        positions=torch.zeros(starts[-1], dtype=torch.long, device=device),
        query_lens_cpu=[q for q, _, _ in stages], seq_lens_cpu=seq_lens,
        tree_mask_offsets=None if tree_off is None else torch.tensor(tree_off, **i32),
        tree_masks=None if flat is None else torch.cat(flat).to(device),
    )  # fmt: skip
    return kc, vc, meta


def tree_mask(parents: list[int]) -> torch.Tensor:
    """Ancestor-or-self mask of a token tree given each node's parent (-1: the root)."""
    m = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for i in range(len(parents)):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


def run(stage: Stage, be, quick: bool) -> None:
    checks = KernelChecks(be, stage, quick)
    stage.data["tolerances"] = {_dt(d): dict(zip(("gemm", "attention", "elementwise"), t)) for d, t in TOL.items()}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        if not be.supports_dtype(dtype):
            stage.skip(f"{_dt(dtype)} kernels", f"the {be.name} backend has no {_dt(dtype)} (the Triton interpreter "
                       "has no bfloat16)")  # fmt: skip
            continue
        checks.gemm(dtype)
        checks.attention(dtype)
        checks.support(dtype)
        checks.moe(dtype)
