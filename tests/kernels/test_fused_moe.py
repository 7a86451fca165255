"""Fused MoE (``triton_kernels/fused_moe.py``, host plan ``moe_plan.py``) under the Triton interpreter:
routing against ``moe_route_ref``; the fused experts against ``fused_moe_ref`` (quantized experts: on
``dequantize_ref`` weights) for T = 1 ... 4096, odd H and I, skewed / empty experts, k = E, expert
parallelism, every interpreter menu tile and every distinct tile of the device profiles (persistent
grids on Ascend); virtual padding; the deterministic combine; the plans' MACs; the Triton backend's
ops; and that the comparisons catch a dropped routing weight and an off-by-one in the expert offsets.

Every output buffer is NaN-poisoned first. Inputs are fresh random per run (the ``gen`` fixture
prints the seed; ``PXY_TEST_SEED`` replays it). fp32 / fp16 only: the interpreters have no bf16."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit function is created

import dataclasses  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from portable_xy.backends.profile import load_profile  # noqa: E402
from portable_xy.backends.quant import QTYPES, QuantWeight, dequantize_ref, quantize_ref  # noqa: E402
from portable_xy.backends.reference import fused_moe_ref, moe_route_ref  # noqa: E402
from portable_xy.tools import aot_specs  # noqa: E402
from portable_xy.triton_kernels import fused_moe as fm  # noqa: E402
from portable_xy.triton_kernels import gemm_plan as gp  # noqa: E402
from portable_xy.triton_kernels import moe_plan as mp  # noqa: E402
from portable_xy.triton_kernels.quant_gemm import tiled_profile  # noqa: E402

if type(fm.moe_gemm_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton_kernels were imported without TRITON_INTERPRET=1 in this process", allow_module_level=True)

DTYPES = (torch.float32, torch.float16)
# (atol, rtol) against fused_moe_ref (all fp32 from the same rounded inputs): fp32 differs in
# summation order only; fp16 also rounds silu(gate) * up, each slot's output and the sum to fp16
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2)}
HID, INTER = 40, 24  # not multiples of any tile: N and K tails in both GEMMs
DEVICE_PROFILES = [("cuda", None), ("cuda", "sm80"), ("cuda", "sm90"), ("ascend", None), ("ascend", "910b"),
                   ("ascend", "910_93")]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_tuned_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTABLE_XY_PROFILE_DIR", str(tmp_path / "tuned"))


def _prof(vendor="interpret", arch=None, **gemm):
    p = load_profile(vendor, arch)
    if gemm:
        p = dataclasses.replace(p, data={**p.data, "gemm": {**p.gemm, **gemm}})
    return p


def _experts(gen, E, dtype, h=HID, i=INTER):
    w13 = (torch.randn(E, 2 * i, h, generator=gen) / math.sqrt(h)).to(dtype)
    w2 = (torch.randn(E, h, i, generator=gen) / math.sqrt(i)).to(dtype)
    return w13, w2


def _separated_logits(gen, T, E):
    """Router logits whose experts are >= 0.25 apart in every row: top-k is unambiguous."""
    ranks = torch.argsort(torch.rand(T, E, generator=gen), dim=1).float()
    return 0.3 * ranks + 0.02 * torch.rand(T, E, generator=gen)


def _routing(gen, T, E, k, renormalize=True):
    return moe_route_ref(_separated_logits(gen, T, E), k, renormalize)


def _check(y, x, w13, w2, weights, ids, expert_start=0):
    assert y.dtype == x.dtype
    assert not torch.isnan(y).any(), "an output element was not written"
    want = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids, expert_start)
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(y.float(), want, atol=atol, rtol=rtol)


def _run(x, w13, w2, weights, ids, prof, poison, expert_start=0, plan=None):
    out = poison(torch.empty(x.shape, dtype=x.dtype))
    return fm.fused_moe(x, w13, w2, weights, ids, prof, expert_start, plan=plan, out=out)


# ---- routing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,k", [(4, 1), (8, 2), (6, 6), (60, 4), (128, 8)])
def test_route_matches_reference(E, k, dtype, gen, poison):
    prof = _prof()
    for T in (1, 37):
        for renormalize in (False, True):
            big = _separated_logits(gen, T, 2 * E + 3).to(dtype)
            logits = big[:, 1 : 2 * E + 1 : 2]  # strided columns
            want_w, want_ids = moe_route_ref(logits, k, renormalize)
            w, ids = fm.moe_route(logits, k, renormalize, prof)
            assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == ids.shape == (T, k)
            assert torch.equal(ids, want_ids)
            torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-5)
            if renormalize:
                torch.testing.assert_close(w.sum(-1), torch.ones(T))


def test_route_ties_go_to_the_lowest_expert_id():
    w, ids = fm.moe_route(torch.zeros(3, 5), 3, False)
    assert ids.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(w, torch.full((3, 3), 0.2))


# ---- fused experts against the reference ----------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_moe_all_token_counts(dtype, gen, poison):
    prof = _prof()
    E, k = 4, 2
    w13, w2 = _experts(gen, E, dtype)
    for T in (1, 2, 3, 4, 17, 64, 129, 300) + ((4096,) if dtype == torch.float16 else (1000,)):
        x = torch.randn(T, HID, generator=gen).to(dtype)
        weights, ids = _routing(gen, T, E, k, renormalize=T % 2 == 0)
        _check(_run(x, w13, w2, weights, ids, prof, poison), x, w13, w2, weights, ids)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_skewed_empty_and_all_experts(dtype, gen, poison):
    prof = _prof()
    E, T = 8, 300
    w13, w2 = _experts(gen, E, dtype)
    x = torch.randn(T, HID, generator=gen).to(dtype)
    # every token to expert 2 (k = 1): one expert gets all rows, seven are empty
    ids = torch.full((T, 1), 2, dtype=torch.long)
    weights = torch.rand(T, 1, generator=gen)
    plan = fm.plan_for(ids, w13, w2, prof, elem_bytes=x.element_size())
    assert plan.counts == (0, 0, T, 0, 0, 0, 0, 0)
    _check(_run(x, w13, w2, weights, ids, prof, poison, plan=plan), x, w13, w2, weights, ids)
    # k = 2 over experts {1, 5, 6} only (five empty experts), unequal loads
    pick = torch.tensor([[1, 5], [5, 6], [6, 1], [6, 5], [1, 6]])[torch.randint(0, 5, (T,), generator=gen)]
    weights = torch.rand(T, 2, generator=gen)
    _check(_run(x, w13, w2, weights, pick, prof, poison), x, w13, w2, weights, pick)
    # top-k == number of experts: every token visits every expert
    E4 = 4
    w13, w2 = w13[:E4], w2[:E4]
    for T in (1, 37):
        weights, ids = _routing(gen, T, E4, E4)
        x = torch.randn(T, HID, generator=gen).to(dtype)
        plan = fm.plan_for(ids, w13, w2, prof)
        assert plan.counts == (T,) * E4
        _check(_run(x, w13, w2, weights, ids, prof, poison, plan=plan), x, w13, w2, weights, ids)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expert_parallel_ranks_sum_to_the_whole(dtype, gen, poison):
    prof = _prof()
    E, k, T = 8, 3, 53
    w13, w2 = _experts(gen, E, dtype)
    x = torch.randn(T, HID, generator=gen).to(dtype)
    weights, ids = _routing(gen, T, E, k)
    parts = []
    for start, stop in ((0, 3), (3, 6), (6, 8)):  # three ranks own experts [start, stop)
        y = _run(x, w13[start:stop], w2[start:stop], weights, ids, prof, poison, expert_start=start)
        _check(y, x, w13[start:stop], w2[start:stop], weights, ids, expert_start=start)
        parts.append(y.float())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(sum(parts), fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids),
                               atol=3 * atol, rtol=rtol)  # fmt: skip
    # a rank none of whose experts is chosen writes zeros
    y = _run(x, w13[:2], w2[:2], weights, ids, prof, poison, expert_start=100)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tile", load_profile("interpret").gemm["tiles"], ids=lambda t: gp.GemmTile.from_dict(t).name)
def test_every_interpreter_menu_tile(tile, dtype, gen, poison):
    prof = _prof()
    E, k = 5, 2
    w13, w2 = _experts(gen, E, dtype)
    for T in (3, 37):
        x = torch.randn(T, HID, generator=gen).to(dtype)
        weights, ids = _routing(gen, T, E, k)
        plan = fm.plan_for(ids, w13, w2, prof, tile=tile)
        assert {ln.tile.BLOCK_M for ln in plan.gate_up.launches + plan.down.launches} == {tile["BLOCK_M"]}
        _check(_run(x, w13, w2, weights, ids, prof, poison, plan=plan), x, w13, w2, weights, ids)


def _device_tiles():
    seen = {}
    for vendor, arch in DEVICE_PROFILES:
        p = load_profile(vendor, arch)
        for t in p.gemm["tiles"]:
            tile = gp.GemmTile.from_dict(t)
            seen.setdefault((tile.BLOCK_M, tile.BLOCK_N, tile.BLOCK_K, vendor), (vendor, arch, tile))
    return list(seen.values())


@pytest.mark.parametrize("vendor,arch,tile", _device_tiles(), ids=lambda v: v.name if hasattr(v, "name") else str(v))
def test_device_profile_tiles(vendor, arch, tile, gen, poison):
    prof = load_profile(vendor, arch)  # Ascend profiles are persistent: grid = cores, loop over tasks
    h, i = tile.BLOCK_K + 24, tile.BLOCK_N // 2 + 8  # K tails; I: half a gate-up tile + a tail
    E, k, T = 3, 2, 21
    w13, w2 = _experts(gen, E, torch.float16, h, i)
    x = torch.randn(T, h, generator=gen).half()
    weights, ids = _routing(gen, T, E, k)
    plan = fm.plan_for(ids, w13, w2, prof, tile=tile)
    assert plan.gate_up.persistent == (vendor == "ascend")
    _check(_run(x, w13, w2, weights, ids, prof, poison, plan=plan), x, w13, w2, weights, ids)


def test_persistent_grid_and_group_order(gen, poison):
    E, k, T = 4, 2, 150
    w13, w2 = _experts(gen, E, torch.float32)
    x = torch.randn(T, HID, generator=gen)
    weights, ids = _routing(gen, T, E, k)
    ys = []
    for persistent, group_m in ((False, 1), (True, 3), (False, 8)):
        base = _prof(persistent=persistent, group_m=group_m)
        prof = dataclasses.replace(base, data={**base.data, "num_cores": 3})
        plan = fm.plan_for(ids, w13, w2, prof, elem_bytes=4)
        if persistent:
            assert all(ln.programs <= 3 for ln in plan.gate_up.launches + plan.down.launches)
        ys.append(_run(x, w13, w2, weights, ids, prof, poison, plan=plan))
        _check(ys[-1], x, w13, w2, weights, ids)
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])  # the order of tiles changes no bits


# ---- quantized experts ------------------------------------------------------------------------------
def _quant_experts(gen, E, qtype, h, i):
    w13 = [quantize_ref(torch.randn(2 * i, h, generator=gen) / math.sqrt(h), qtype) for _ in range(E)]
    w2 = [quantize_ref(torch.randn(h, i, generator=gen) / math.sqrt(i), qtype) for _ in range(E)]
    dq = [torch.stack([dequantize_ref(w) for w in ws]) for ws in (w13, w2)]
    return mp.stack_experts(w13), mp.stack_experts(w2), dq[0], dq[1]


@pytest.mark.parametrize("qtype", tuple(QTYPES))
def test_quantized_experts(qtype, gen, poison):
    prof = _prof()
    h, i = 96, 32  # K = 96: a 32-group tail in a 64-wide K tile; K = 32: half a K tile; N tails too
    E, k = 4, 2
    q13, q2, d13, d2 = _quant_experts(gen, E, qtype, h, i)
    assert isinstance(q13, QuantWeight) and q13.qs.shape[0] == E
    for dtype in DTYPES:
        for T in (1, 70):
            x = torch.randn(T, h, generator=gen).to(dtype)
            weights, ids = _routing(gen, T, E, k)
            _check(_run(x, q13, q2, weights, ids, prof, poison), x, d13, d2, weights, ids)
    for tile in tiled_profile(prof).gemm["tiles"]:  # every tile of the quant menu
        x = torch.randn(5, h, generator=gen).half()
        weights, ids = _routing(gen, 5, E, k)
        plan = fm.plan_for(ids, q13, q2, prof, tile=tile)
        _check(_run(x, q13, q2, weights, ids, prof, poison, plan=plan), x, d13, d2, weights, ids)


def test_quantized_experts_persistent_expert_parallel(gen, poison):
    prof = load_profile("ascend", "910b")  # persistent grids, the Ascend quant menu
    q13, q2, d13, d2 = _quant_experts(gen, 4, "q4_1", 160, 64)
    weights, ids = _routing(gen, 19, 6, 2)
    x = torch.randn(19, 160, generator=gen).half()
    y = _run(x, q13, q2, weights, ids, prof, poison, expert_start=2)
    _check(y, x, d13, d2, weights, ids, expert_start=2)


# ---- virtual padding, strided operands, the combine -------------------------------------------------
def test_strided_operands_and_out_window(gen):
    prof = _prof()
    E, k, T = 3, 2, 19
    w13, w2 = _experts(gen, E, torch.float32)
    big_x = torch.full((T + 32, 2 * HID), float("nan"))  # NaN outside x: never read
    x = big_x[:T, ::2]
    x.copy_(torch.randn(T, HID, generator=gen))
    weights, ids = _routing(gen, T, E, k)
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2I, H], unit stride along 2I (not H)
    big_y = torch.full((T + 8, HID + 16), float("nan"))
    y = fm.fused_moe(x, w13_t, w2, weights, ids.int(), prof, out=big_y[:T, 8 : 8 + HID])
    _check(y, x, w13, w2, weights, ids)
    assert torch.isnan(big_y[T:]).all() and torch.isnan(big_y[:, :8]).all() and torch.isnan(big_y[:, 8 + HID :]).all()
    plan = fm.plan_for(ids, w13, w2, prof)
    assert plan.gate_up.padded_rows > 0 and plan.down.padded_rows > 0  # the padded rows were masked


def test_combine_reads_only_local_slots(gen):
    T, k, h = 23, 3, 70
    ids = torch.randint(0, 8, (T, k), generator=gen)
    y = torch.randn(T * k, h, generator=gen).half()
    local = ((ids >= 2) & (ids < 5)).reshape(-1)
    y[~local] = float("nan")  # slots of other ranks' experts hold garbage
    out = torch.full((T, h), float("nan"), dtype=torch.float16)
    fm.moe_combine(y, ids, 2, 3, out, _prof())
    want = torch.where(local[:, None], y.float(), 0.0).view(T, k, h).sum(1)
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=1e-3)


# ---- plans ------------------------------------------------------------------------------------------
def test_plan_tasks_cover_every_row_once():
    prof = _prof()
    counts = [0, 1, 17, 300, 64, 0, 5]
    plan = mp.plan_moe_counts(counts, (48, 40), (40, 24), prof)
    assert plan.offsets == (0, 0, 1, 18, 318, 382, 382, 387) and plan.num_assignments == 387
    for g in (plan.gate_up, plan.down):
        covered = [0] * plan.num_assignments
        for e, r0, rows in g.tasks:
            assert plan.offsets[e] <= r0 and r0 + rows <= plan.offsets[e + 1] and rows > 0
            for r in range(r0, r0 + rows):
                covered[r] += 1
        assert covered == [1] * plan.num_assignments
        assert sum(ln.num_tasks for ln in g.launches) == len(g.tasks)
        assert len({ln.tile for ln in g.launches}) == len(g.launches)  # one launch per tile
        assert g.useful_macs == plan.num_assignments * g.N * g.K
        assert g.executed_macs >= g.useful_macs
        for e, c in enumerate(counts):  # each expert is planned by SmoothGEMM's planner for its count
            assert (g.expert_plans[e] is None) == (c == 0)
            if c:
                assert g.expert_plans[e] == gp.plan_gemm(c, g.N, g.K, prof, objective="padding")
    assert plan.useful_macs == plan.gate_up.useful_macs + plan.down.useful_macs


def test_per_expert_tiles_pad_less_than_one_global_tile():
    """Decode (one row per chosen expert) runs the smallest tile; one global 64-row tile (vLLM's
    aligned padding with BLOCK_M = 64) executes far more MACs for the same routing."""
    prof = _prof()
    counts = [1, 0, 1, 0, 0, 1, 0, 1]
    plan = mp.plan_moe_counts(counts, (256, 128), (128, 128), prof)
    assert {ln.tile.BLOCK_M for ln in plan.gate_up.launches} == {16}
    big = gp.GemmTile.from_dict(prof.gemm["tiles"][-1])
    vllm_like = mp.plan_moe_counts(counts, (256, 128), (128, 128), prof, tile=big)
    assert vllm_like.executed_macs >= 4 * plan.executed_macs
    assert plan.useful_macs == vllm_like.useful_macs == 4 * (256 * 128 + 128 * 128)


def test_plan_moe_sorts_slots_by_expert(gen):
    prof = _prof()
    ids = torch.tensor([[3, 1], [1, 9], [0, 3], [3, -2]])
    plan = mp.plan_moe(ids, 4, 0, (48, 40), (40, 24), prof)
    assert plan.counts == (1, 2, 0, 3)
    assert plan.sorted_ids.tolist() == [4, 1, 2, 0, 5, 6]  # tokens ascending within an expert
    plan = mp.plan_moe(ids, 2, 1, (48, 40), (40, 24), prof)  # local experts 1 and 2
    assert plan.counts == (2, 0) and plan.sorted_ids.tolist() == [1, 2]


# ---- the Triton backend's MoE ops ---------------------------------------------------------------
def test_backend_stacks_experts_and_falls_back(gen):
    from portable_xy.backends import get_backend

    be = get_backend("interpret")
    E, k, T = 4, 2, 11
    w13, w2 = _experts(gen, E, torch.float32)
    x = torch.randn(T, HID, generator=gen)
    logits = _separated_logits(gen, T, E)
    weights, ids = be.moe_route(logits, k, True)
    want_w, want_ids = moe_route_ref(logits, k, True)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w)
    s13, s2 = be.prepare_experts(list(w13)), be.prepare_experts(list(w2))
    assert isinstance(s13, torch.Tensor) and s13.shape == (E, 2 * INTER, HID)
    _check(be.fused_moe(x, s13, s2, weights, ids), x, w13, w2, weights, ids)
    assert isinstance(be.prepare_experts([w2[0], w2[1].half(), w2[2], w2[3]]), list)  # mixed dtypes do not stack
    _check(be.fused_moe(x, s13, list(w2), weights, ids), x, w13, w2, weights, ids)  # a list: the base loop
    q13, q2, d13, d2 = _quant_experts(gen, E, "q8_0", 64, 32)
    q13 = be.prepare_experts(mp.unstack_experts(q13))
    assert isinstance(q13, QuantWeight) and q13.qs.shape[0] == E
    xq = torch.randn(T, 64, generator=gen)
    _check(be.fused_moe(xq, q13, q2, weights, ids), xq, d13, d2, weights, ids)


# ---- the tests can fail -----------------------------------------------------------------------------
def test_a_dropped_routing_weight_is_caught(gen, poison, monkeypatch):
    prof = _prof()
    E, k, T = 4, 2, 17
    w13, w2 = _experts(gen, E, torch.float32)
    x = torch.randn(T, HID, generator=gen)
    weights, ids = _routing(gen, T, E, k)
    _check(_run(x, w13, w2, weights, ids, prof, poison), x, w13, w2, weights, ids)
    monkeypatch.setattr(fm, "_slot_weights", lambda w: torch.ones(w.numel()))
    with pytest.raises(AssertionError):
        _check(_run(x, w13, w2, weights, ids, prof, poison), x, w13, w2, weights, ids)


def test_an_off_by_one_in_the_expert_offsets_is_caught(gen, poison, monkeypatch):
    prof = _prof()
    E, k, T = 4, 2, 17
    w13, w2 = _experts(gen, E, torch.float32)
    x = torch.randn(T, HID, generator=gen)
    weights, ids = _routing(gen, T, E, k)
    ids[0] = torch.tensor([0, 1])  # expert 0 has a row: the shifted offsets below stay in range
    real = mp.expert_offsets
    monkeypatch.setattr(mp, "expert_offsets", lambda counts: [0] + [o - 1 for o in real(counts)[1:-1]] + [sum(counts)])
    with pytest.raises(AssertionError):
        _check(_run(x, w13, w2, weights, ids, prof, poison), x, w13, w2, weights, ids)


# ---- AOT specs --------------------------------------------------------------------------------------
def test_aot_specs_cover_every_argument():
    for vendor, arch in (("cuda", "sm80"), ("cuda", "sm90"), ("rocm", "gfx942"), ("ascend", "910b")):
        prof = load_profile(vendor, arch)
        specs = aot_specs.fused_moe(prof)
        n_dt = len(aot_specs.half_dtypes(prof))
        n_plain, n_quant = len(prof.gemm["tiles"]), len(prof.data["quant_gemm"]["tiles"])
        assert len(specs) == n_dt * (2 * n_plain + 4 * n_quant + 3)
        for spec in specs:
            assert set(spec["signature"]) | set(spec["constexprs"]) == set(spec["fn"].arg_names), spec["name"]
            assert all(spec["signature"][c] == "constexpr" for c in spec["constexprs"])
            gemm = spec["fn"] in (fm.moe_gemm_kernel, fm.moe_quant_gemm_kernel)
            assert spec["expect_tensor_cores"] is gemm
            if gemm:
                assert spec["constexprs"]["GATE_UP"] == ("_gate_up_" in spec["name"])
