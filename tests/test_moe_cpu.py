"""The routed experts on the CPU backend (tokens grouped by expert, then the C kernels or torch per
expert) against the reference op ``fused_moe_ref``: fp32, bf16 and quantized experts, skewed
routing, empty experts, top-k equal to the expert count, expert-parallel slices, M = 1 ... 4096."""

from __future__ import annotations

import pytest
import torch

from portable_xy.backends import base, cpu_native, get_backend
from portable_xy.backends.quant import dequantize_ref, quantize_ref
from portable_xy.backends.reference import fused_moe_ref, moe_route_ref


@pytest.fixture(scope="module")
def cpu():
    return get_backend("cpu")


def experts(e: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(e, n, k, generator=g) * k**-0.5


def routing(t: int, e: int, top_k: int, g: torch.Generator, skew: str = "random"):
    """fp32 weights and ids ``[T, k]``: ``random`` logits, ``one`` (every token's first choice
    expert 0), ``few`` (experts 1 and 2 only: the others empty)."""
    logits = torch.randn(t, e, generator=g) * 3
    if skew == "one":
        logits[:, 0] += 100
    elif skew == "few":
        logits[:, 3:] -= 100
        logits[:, 0] -= 100
    return moe_route_ref(logits, top_k, renormalize=True)


def run(be, x, w13, w2, w, ids, prep, start=0):
    return be.fused_moe(x, be.prepare_experts([prep(m) for m in w13]), be.prepare_experts([prep(m) for m in w2]),
                        w, ids, start)  # fmt: skip


CASES = [  # (T, E, top_k, skew)
    (1, 8, 2, "random"),
    (7, 8, 2, "one"),
    (33, 8, 2, "few"),
    (19, 4, 4, "random"),  # top-k == expert count
    (300, 16, 2, "random"),
    (4096, 8, 2, "random"),
]


@pytest.mark.parametrize("t,e,top_k,skew", CASES)
def test_fp32_experts_match_reference(cpu, t, e, top_k, skew):
    g = torch.Generator().manual_seed(t + e)
    h, i = 48, 40  # odd sizes: not multiples of any tile
    x = torch.randn(t, h, generator=g)
    w13, w2 = experts(e, 2 * i, h, g), experts(e, h, i, g)
    w, ids = routing(t, e, top_k, g, skew)
    want = fused_moe_ref(x, w13, w2, w, ids)
    torch.testing.assert_close(run(cpu, x, w13, w2, w, ids, cpu.prepare_weight), want, rtol=1e-5, atol=1e-5)


def test_expert_parallel_slices_sum_to_the_whole(cpu):
    g = torch.Generator().manual_seed(3)
    t, e, h, i = 50, 8, 32, 24
    x = torch.randn(t, h, generator=g)
    w13, w2 = experts(e, 2 * i, h, g), experts(e, h, i, g)
    w, ids = routing(t, e, 2, g)
    parts = [run(cpu, x, w13[s : s + 2], w2[s : s + 2], w, ids, cpu.prepare_weight, s) for s in range(0, e, 2)]
    torch.testing.assert_close(sum(parts), fused_moe_ref(x, w13, w2, w, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[1], fused_moe_ref(x, w13[2:4], w2[2:4], w, ids, 2), rtol=1e-5, atol=1e-5)


needs_c = pytest.mark.skipif(cpu_native.load() is None, reason="the C kernels (cpu_native) need a C compiler")


@needs_c
@pytest.mark.parametrize("t,e,top_k,skew", CASES[:5])
def test_bf16_experts_match_reference(cpu, t, e, top_k, skew):
    g = torch.Generator().manual_seed(7 * t + e)
    h, i = 64, 96
    x = torch.randn(t, h, generator=g).bfloat16()
    w13, w2 = experts(e, 2 * i, h, g).bfloat16(), experts(e, h, i, g).bfloat16()
    w, ids = routing(t, e, top_k, g, skew)
    got = run(cpu, x, w13, w2, w, ids, cpu.prepare_weight).float()
    want = fused_moe_ref(x.float(), w13.float(), w2.float(), w, ids)
    assert (got - want).norm() / want.norm() < 0.02


@needs_c
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("int8", [True, False])
@pytest.mark.parametrize("t", [1, 5, 77])
def test_quantized_experts_match_reference(cpu, qtype, int8, t):
    """Each expert's blocks go to the C kernels as they are; the oracle dequantizes the same blocks."""
    g = torch.Generator().manual_seed(t)
    e, h, i = 8, 64, 96
    x = torch.randn(t, h, generator=g)
    q13 = [quantize_ref(m, qtype) for m in experts(e, 2 * i, h, g)]
    q2 = [quantize_ref(m, qtype) for m in experts(e, h, i, g)]
    w, ids = routing(t, e, 2, g, "few" if t == 5 else "random")
    prep = lambda ms: cpu.prepare_experts([cpu.prepare_quant_weight(m, int8) for m in ms])  # noqa: E731
    got = cpu.fused_moe(x.bfloat16(), prep(q13), prep(q2), w, ids).float()
    deq = lambda ms: torch.stack([dequantize_ref(m) for m in ms])  # noqa: E731
    want = fused_moe_ref(x, deq(q13), deq(q2), w, ids)
    assert (got - want).norm() / want.norm() < (0.03 if int8 else 0.015)


def test_group_by_expert_is_a_partition_in_expert_order():
    g = torch.Generator().manual_seed(1)
    w, ids = routing(40, 8, 3, g)
    seen = []
    for e, rows, weights in base.group_by_expert(ids, w, 2, 4):  # local experts 2..5
        assert bool((ids[rows] == e + 2).any(-1).all())
        for r, wt in zip(rows.tolist(), weights.tolist()):
            j = int((ids[r] == e + 2).nonzero())
            assert wt == pytest.approx(float(w[r, j]))
            seen.append((r, e + 2))
    assert sorted(seen) == sorted((r, int(x)) for r in range(40) for x in ids[r] if 2 <= int(x) < 6)
    assert [e for e, _, _ in base.group_by_expert(ids, w, 2, 4)] == sorted({int(x) - 2 for x in ids.flatten()
                                                                           if 2 <= int(x) < 6})  # fmt: skip


def test_reference_comparison_catches_an_off_by_one_in_expert_offsets(cpu, monkeypatch):
    """The fp32 comparison above fails when each expert's rows start one assignment late."""
    real = base.group_by_expert

    def shifted(topk_ids, topk_weights, expert_start, num_experts):
        k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1).long() - expert_start
        order = torch.argsort(flat, stable=True)
        groups, start = [], int((flat < 0).sum()) + 1  # the off-by-one
        for e in range(num_experts):
            c = int((flat == e).sum())
            sel = order[start : start + c]
            if len(sel):
                groups.append((e, sel // k, topk_weights.reshape(-1)[sel].float()))
            start += c
        return groups

    g = torch.Generator().manual_seed(5)
    t, e, h, i = 33, 8, 48, 40
    x = torch.randn(t, h, generator=g)
    w13, w2 = experts(e, 2 * i, h, g), experts(e, h, i, g)
    w, ids = routing(t, e, 2, g)
    want = fused_moe_ref(x, w13, w2, w, ids)
    assert real is not shifted
    monkeypatch.setattr(base, "group_by_expert", shifted)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(run(cpu, x, w13, w2, w, ids, cpu.prepare_weight), want, rtol=1e-5, atol=1e-5)
