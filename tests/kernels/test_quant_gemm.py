"""Weight-only quantized SmoothGEMM (``triton_kernels/quant_gemm.py``) under the Triton interpreter:
both variants (tiled, split-K) against ``dequantize_ref`` + an fp32 matmul for Q4_0 / Q4_1 / Q8_0,
fp32 and fp16 inputs, with and without bias, odd M and N, K tails inside a tile; virtual padding;
row independence; the shipped ``quant_gemm`` profile sections; the AOT specs.

Every output buffer is NaN-poisoned first: an element the kernel forgets to write fails. Inputs are
fresh random per run (the ``gen`` fixture prints the seed; ``PXY_TEST_SEED`` replays it)."""

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
from portable_xy.tools import aot_specs  # noqa: E402
from portable_xy.triton_kernels import gemm_plan as gp  # noqa: E402
from portable_xy.triton_kernels import quant_gemm as qg  # noqa: E402

if type(qg.quant_gemm_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton_kernels were imported without TRITON_INTERPRET=1 in this process", allow_module_level=True)

QT = tuple(QTYPES)  # q4_0, q4_1, q8_0
DTYPES = (torch.float32, torch.float16)  # the interpreters have no bfloat16
MS = (1, 3, 17, 65)
# (atol, rtol) of the output against x.float() @ dequantize_ref(w).T (+ bias): fp32 inputs differ
# only in summation order; fp16 inputs also round each dequantized weight and the output to fp16
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2)}
DEVICE_PROFILES = [("cuda", None), ("cuda", "sm80"), ("cuda", "sm90"), ("ascend", None), ("ascend", "910b"),
                   ("ascend", "910_93")]  # fmt: skip
ALL_PROFILES = [("interpret", None), ("cpu", None), *DEVICE_PROFILES]


@pytest.fixture(autouse=True)
def _no_tuned_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTABLE_XY_PROFILE_DIR", str(tmp_path / "tuned"))


def _prof(vendor="interpret", arch=None):
    return load_profile(vendor, arch)


def _inputs(gen, M, N, K, qtype, dtype, bias=True):
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = quantize_ref(torch.randn(N, K, generator=gen) / math.sqrt(K), qtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    return x, w, b


def _ref(x, w: QuantWeight, b):
    y = x.float() @ dequantize_ref(w).T
    return y if b is None else y + b.float()


def _check(y, x, w, b):
    assert y.dtype == x.dtype
    assert not torch.isnan(y).any(), "an output element was not written"
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(y.float(), _ref(x, w, b), atol=atol, rtol=rtol)


def _run(x, w, b, prof, plan, poison):
    return qg.quant_linear(x, w, b, prof, plan=plan, out=poison(torch.empty(x.shape[0], w.n, dtype=x.dtype)))


# ---- tiled variant: every tile of the interpreter's quant menu, every M ------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QT)
def test_tiled_menu_tiles_all_m(qtype, dtype, gen, poison):
    prof = _prof()
    N, K = 80, 96  # N not a multiple of BLOCK_N; K = 3 groups of 32, not a multiple of BLOCK_K = 64
    for tile in qg.tiled_profile(prof).gemm["tiles"]:
        for i, M in enumerate(MS):
            x, w, b = _inputs(gen, M, N, K, qtype, dtype, bias=i % 2 == 0)
            plan = gp.single_tile_plan(M, N, K, tile, qg.tiled_profile(prof))
            _check(_run(x, w, b, prof, plan, poison), x, w, b)


# ---- split-K variant: split counts 1..3 (an uneven last split), every M ------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", QT)
def test_split_k_all_m(qtype, dtype, gen, poison):
    prof = _prof()
    N, K = 80, 352  # 5.5 K tiles of 64: split 3 -> ranges of 128, 128, 96 (the last one ends in a tail)
    for split in (1, 2, 3):
        for i, M in enumerate((*MS[:2], 16, 17)):
            x, w, b = _inputs(gen, M, N, K, qtype, dtype, bias=(i + split) % 2 == 0)
            plan = qg.split_k_plan(M, N, K, prof, split_k=split)
            assert plan.split_k == split and plan.k_per_split % plan.tile.BLOCK_K == 0
            assert (split - 1) * plan.k_per_split < K <= split * plan.k_per_split
            _check(_run(x, w, b, prof, plan, poison), x, w, b)


def test_k_smaller_than_block_k(gen, poison):
    """K = 32: one scale group, half of a 64-wide K tile (the whole tile is a tail)."""
    prof = _prof()
    for qtype in QT:
        for M in (1, 17):
            x, w, b = _inputs(gen, M, 40, 32, qtype, torch.float32)
            _check(_run(x, w, b, prof, qg.plan_quant_gemm(M, 40, 32, prof, 4), poison), x, w, b)


# ---- the planner's choice per M, leading dims -------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_planned_quant_linear(dtype, gen, poison):
    prof = _prof()
    N, K = 96, 160
    small = prof.data["quant_gemm"]["small_m"]["max_m"]
    for qtype in QT:
        for M in (*MS, 16):
            plan = qg.plan_quant_gemm(M, N, K, prof, torch.empty(0, dtype=dtype).element_size())
            assert isinstance(plan, qg.SplitKPlan if M <= small else gp.GemmPlan), (M, plan)
            x, w, b = _inputs(gen, M, N, K, qtype, dtype, bias=M % 2 == 1)
            _check(qg.quant_linear(x, w, b, prof, out=poison(torch.empty(M, N, dtype=dtype))), x, w, b)
    x, w, b = _inputs(gen, 6, N, K, "q4_0", dtype)
    y = qg.quant_linear(x.view(2, 3, K), w, b, prof)
    assert y.shape == (2, 3, N)
    _check(y.reshape(6, N), x, w, b)


def test_decode_plan_splits_k_to_fill_the_cores():
    prof = _prof()  # 4 fake cores, split at most 4
    p = qg.plan_quant_gemm(1, 32, 1024, prof)
    assert isinstance(p, qg.SplitKPlan) and p.tiles_n == 1 and p.split_k == 4 and p.num_tiles == 4
    assert qg.plan_quant_gemm(1, 4 * 32, 1024, prof).split_k == 1  # enough N tiles already
    h100 = _prof("cuda", "sm90")
    d = qg.plan_quant_gemm(1, 1536, 4096, h100)
    assert isinstance(d, qg.SplitKPlan) and d.split_k > 1 and d.num_tiles <= 2 * 132 + d.tiles_n
    big = qg.plan_quant_gemm(4096, 4096, 4096, h100)
    assert isinstance(big, gp.GemmPlan) and big.segments[0].tile.BLOCK_M == 128
    for s in big.segments:
        assert s.tile in {gp.GemmTile.from_dict(t) for t in h100.data["quant_gemm"]["tiles"]}


# ---- each distinct tile of the device profiles (the interpreter runs any tile) ----------------
def _device_variants():
    seen = {}
    for vendor, arch in DEVICE_PROFILES:
        p = load_profile(vendor, arch)
        q = p.data["quant_gemm"]
        for t in q["tiles"]:
            tile = gp.GemmTile.from_dict(t)
            seen.setdefault((tile.BLOCK_M, tile.BLOCK_N, tile.BLOCK_K, vendor, False), (vendor, arch, tile, False))
        tile = gp.GemmTile.from_dict(q["small_m"]["tile"])
        seen.setdefault((tile.BLOCK_M, tile.BLOCK_N, tile.BLOCK_K, vendor, True), (vendor, arch, tile, True))
    return list(seen.values())


def _variant_id(v):
    return v.name if isinstance(v, gp.GemmTile) else ("splitk" if v is True else "tiled" if v is False else str(v))


@pytest.mark.parametrize("vendor,arch,tile,split", _device_variants(), ids=_variant_id)
def test_device_profile_tiles(vendor, arch, tile, split, gen, poison):
    prof = load_profile(vendor, arch)  # ascend profiles are persistent: grid = cores, loop over tiles
    N, K = tile.BLOCK_N + 24, tile.BLOCK_K * 2 + 32  # N tail, K tail of one 32-group
    for qtype, dtype, M in (("q4_0", torch.float16, 5), ("q4_1", torch.float32, 37), ("q8_0", torch.float16, 37)):
        M = min(M, 16) if split else M
        x, w, b = _inputs(gen, M, N, K, qtype, dtype)
        if split:
            plan = qg.split_k_plan(M, N, K, prof, split_k=2, tile=tile)
            assert plan.split_k == 2 and plan.persistent == (vendor == "ascend")
        else:
            plan = gp.single_tile_plan(M, N, K, tile, qg.tiled_profile(prof))
        _check(_run(x, w, b, prof, plan, poison), x, w, b)


# ---- virtual padding: selective read and write; strided out; rows do not interact --------------
@pytest.mark.parametrize("variant", ["tiled", "splitk"])
def test_virtual_padding_and_strided_out(variant, gen):
    prof = _prof()
    M, N, K = 5 if variant == "splitk" else 17, 70, 192
    big_x = torch.full((M + 64, K), float("nan"))  # rows past M are NaN: they must never be read
    x = big_x[:M]
    x.copy_(torch.randn(M, K, generator=gen))
    _, w, b = _inputs(gen, M, N, K, "q4_1", torch.float32)
    tiled = qg.tiled_profile(prof)
    if variant == "splitk":
        plan = qg.split_k_plan(M, N, K, prof, split_k=3)
    else:
        plan = gp.single_tile_plan(M, N, K, tiled.gemm["tiles"][1], tiled)
    big_y = torch.full((M + 40, N + 30), float("nan"))  # a strided window; nothing outside it is written
    y = qg.quant_linear(x, w, b, prof, plan=plan, out=big_y[:M, 10 : 10 + N])
    _check(y, x, w, b)
    assert torch.isnan(big_y[M:]).all() and torch.isnan(big_y[:, :10]).all() and torch.isnan(big_y[:, 10 + N :]).all()
    if variant == "tiled":
        assert plan.padded_rows > 0


@pytest.mark.parametrize("M", [3, 65])
def test_rows_do_not_leak(M, gen):
    prof = _prof()
    x, w, b = _inputs(gen, M, 64, 128, "q4_0", torch.float32)
    full = qg.quant_linear(x, w, b, prof)
    x2 = x.clone()
    x2[1:] = torch.randn(M - 1, 128, generator=gen) * 1e4
    assert torch.equal(qg.quant_linear(x2, w, b, prof)[0], full[0])


# ---- the comparison is sharp enough to catch the classic unpacking bugs -----------------------
def _swap_nibbles(w: QuantWeight) -> QuantWeight:
    return dataclasses.replace(w, qs=(w.qs >> 4) | ((w.qs & 0x0F) << 4))


def _without_m(w: QuantWeight) -> QuantWeight:
    return dataclasses.replace(w, m=torch.zeros_like(w.m))


@pytest.mark.parametrize("qtype", QT)
def test_wrong_dequantizations_are_far_outside_the_tolerance(qtype, gen):
    prof = _prof()
    for M in (1, 33):  # split-K and tiled
        x, w, b = _inputs(gen, M, 48, 128, qtype, torch.float16)
        y = qg.quant_linear(x, w, b, prof).float()
        atol, _ = TOL[torch.float16]
        wrong = [_without_m(w)] + ([_swap_nibbles(w)] if w.bits == 4 else [])
        for bad in wrong:
            assert (y - _ref(x, bad, b)).abs().max() > 20 * atol, (qtype, M)


# ---- argument checks ------------------------------------------------------------------------------
def test_empty_and_bad_inputs():
    prof = _prof()
    w = quantize_ref(torch.randn(8, 64), "q4_0")
    assert qg.quant_linear(torch.randn(0, 64), w, None, prof).shape == (0, 8)
    with pytest.raises(ValueError, match="K=63"):
        qg.quant_linear(torch.randn(3, 63), w, None, prof)
    with pytest.raises(TypeError):
        qg.quant_linear(torch.randn(3, 64), w, torch.randn(8).half(), prof)
    with pytest.raises(ValueError, match="plan is for"):
        qg.quant_linear(torch.randn(3, 64), w, None, prof, plan=qg.split_k_plan(4, 8, 64, prof))
    with pytest.raises(ValueError, match="out must be"):
        qg.quant_linear(torch.randn(3, 64), w, None, prof, out=torch.empty(3, 9))
    with pytest.raises(ValueError, match="profile or a plan"):
        qg.quant_linear(torch.randn(3, 64), w, None)


# ---- profiles and AOT specs (pure Python) -------------------------------------------------------
@pytest.mark.parametrize("vendor,arch", ALL_PROFILES)
def test_shipped_quant_menus_are_valid(vendor, arch):
    prof = load_profile(vendor, arch)
    assert qg.quant_menu_problems(prof) == []
    q = prof.data["quant_gemm"]
    tiles = [gp.GemmTile.from_dict(t) for t in [*q["tiles"], q["small_m"]["tile"]]]
    assert 1 <= q["small_m"]["max_m"] <= 64 and q["small_m"]["max_split_k"] >= 1
    if vendor == "cuda":
        assert all({"num_warps", "num_stages"} <= set(t.launch_options) for t in tiles)
    if vendor == "ascend":
        assert all(t.launch_options.get("multibuffer") is True and "num_warps" not in t.launch_options for t in tiles)
        assert all(qg.quant_live_bytes(t) <= prof.data["onchip"]["live_budget_bytes"] for t in tiles)


def test_quant_menu_problems_flags_bad_tiles():
    p = _prof()
    tiles = [{"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 48}]
    bad = dataclasses.replace(p, data={**p.data, "quant_gemm": {"tiles": tiles}})
    probs = qg.quant_menu_problems(bad)
    assert any("BLOCK_K=16 is not a multiple of 32" in s for s in probs)
    assert any("mixes BLOCK_K" in s for s in probs) and any("powers of two" in s for s in probs)


def test_aot_specs_cover_every_argument():
    for vendor, arch in (("cuda", "sm80"), ("cuda", "sm90"), ("ascend", "910b")):
        prof = load_profile(vendor, arch)
        specs = aot_specs.quant_gemm(prof)
        n_dt = len(aot_specs.half_dtypes(prof))
        assert len(specs) == n_dt * (2 * (len(prof.data["quant_gemm"]["tiles"]) + 1) + 1)
        for spec in specs:
            names = set(spec["fn"].arg_names)
            assert set(spec["signature"]) | set(spec["constexprs"]) == names
            assert {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"} <= set(spec)
            assert spec["expect_tensor_cores"] is (spec["fn"] is qg.quant_gemm_kernel)
            if spec["fn"] is qg.quant_gemm_kernel:
                assert spec["constexprs"]["BLOCK_K"] % 32 == 0 and spec["signature"]["q_ptr"] == "*u8"
                assert spec["constexprs"]["SPLIT"] == spec["name"].endswith("_splitk")
