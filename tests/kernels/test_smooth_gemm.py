"""SmoothGEMM under the Triton interpreter: every tile of every shipped profile against
``linear_ref``, virtual padding (selective read / write), row independence (bit-exact across
batch sizes and plans) and the planner's properties."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit function is created

import dataclasses  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton")

from portable_xy.backends.profile import Profile, load_profile  # noqa: E402
from portable_xy.backends.reference import linear_ref  # noqa: E402
from portable_xy.tools import aot_specs  # noqa: E402
from portable_xy.triton_kernels import gemm_plan as gp  # noqa: E402
from portable_xy.triton_kernels import smooth_gemm as sg  # noqa: E402

if type(sg.smooth_gemm_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton_kernels were imported without TRITON_INTERPRET=1 in this process", allow_module_level=True)

MS = (1, 3, 17, 127, 300)
DTYPES = (torch.float32, torch.float16)
# (atol, rtol) against the fp32-accumulated reference; fp16 outputs are rounded to fp16
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2)}
DEVICE_PROFILES = [("cuda", None), ("cuda", "sm80"), ("cuda", "sm90"), ("ascend", None), ("ascend", "910b"),
                   ("ascend", "910_93")]  # fmt: skip
ALL_PROFILES = [("interpret", None), *DEVICE_PROFILES]


@pytest.fixture(autouse=True)
def _no_tuned_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTABLE_XY_PROFILE_DIR", str(tmp_path / "tuned"))


def _prof(vendor="interpret", arch=None, **gemm) -> Profile:
    p = load_profile(vendor, arch)
    if gemm:
        p = dataclasses.replace(p, data={**p.data, "gemm": {**p.gemm, **gemm}})
    return p


def _inputs(M, N, K, dtype, bias=True, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


def _poisoned(M, N, dtype):
    return torch.full((M, N), float("nan"), dtype=dtype)


def _check(y, x, w, b):
    ref = linear_ref(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    atol, rtol = TOL[x.dtype]
    assert not torch.isnan(y).any()
    torch.testing.assert_close(y, ref, atol=atol, rtol=rtol)


# ---- every tile of the interpreter profile, every M -------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", load_profile("interpret").gemm["tiles"], ids=lambda t: gp.GemmTile.from_dict(t).name)
def test_interpret_menu_tiles_all_m(tile, dtype):
    prof = _prof()
    N, K = 80, 72  # N and K not multiples of the tiles: masked N tail and K tail
    for M in MS:
        x, w, b = _inputs(M, N, K, dtype, bias=M % 2 == 1)
        plan = gp.single_tile_plan(M, N, K, tile, prof)
        y = sg.smooth_gemm(x, w, b, prof, plan=plan, out=_poisoned(M, N, dtype))
        _check(y, x, w, b)


# ---- each distinct tile of the device profiles (the interpreter runs any tile) ----------------
def _device_tiles():
    seen = {}
    for vendor, arch in DEVICE_PROFILES:
        p = load_profile(vendor, arch)
        for t in p.gemm["tiles"]:
            tile = gp.GemmTile.from_dict(t)
            seen.setdefault((tile.BLOCK_M, tile.BLOCK_N, tile.BLOCK_K, vendor), (vendor, arch, tile))
    return list(seen.values())


@pytest.mark.parametrize("vendor,arch,tile", _device_tiles(), ids=lambda v: v.name if hasattr(v, "name") else str(v))
def test_device_profile_tiles(vendor, arch, tile):
    prof = load_profile(vendor, arch)  # ascend profiles are persistent: grid = cores, loop over tiles
    M, N, K = 37, tile.BLOCK_N + 24, tile.BLOCK_K + 40
    for dtype in DTYPES:
        x, w, b = _inputs(M, N, K, dtype)
        y = sg.smooth_gemm(x, w, b, prof, plan=gp.single_tile_plan(M, N, K, tile, prof), out=_poisoned(M, N, dtype))
        _check(y, x, w, b)


# ---- the planner's own choice, multi-segment plans, persistent grids, swizzles ----------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_planned_gemm_all_m(dtype):
    prof = _prof()
    for M in MS:
        x, w, b = _inputs(M, 96, 64, dtype)
        _check(sg.smooth_gemm(x, w, b, prof, out=_poisoned(M, 96, dtype)), x, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_segment_plan_and_persistent_grid(dtype):
    tiles = load_profile("interpret").gemm["tiles"]
    for persistent, cores in ((False, 4), (True, 3)):
        base = _prof(persistent=persistent)
        prof = dataclasses.replace(base, data={**base.data, "num_cores": cores})
        M, N, K = 300, 70, 48
        plan = gp.plan_from_tiles(M, N, K, [tiles[2], tiles[0]], prof)
        assert [s.m_rows for s in plan.segments] == [256, 44] and plan.padded_rows == 4
        assert all(s.programs == (min(cores, s.num_tiles) if persistent else s.num_tiles) for s in plan.segments)
        x, w, b = _inputs(M, N, K, dtype)
        _check(sg.smooth_gemm(x, w, b, prof, plan=plan, out=_poisoned(M, N, dtype)), x, w, b)


def test_group_m_swizzle_does_not_change_bits():
    x, w, b = _inputs(127, 150, 64, torch.float32)
    ys = [sg.smooth_gemm(x, w, b, _prof(group_m=g)) for g in (1, 3, 8)]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


# ---- virtual padding: selective read and selective write --------------------------------------
def test_virtual_padding_never_touches_rows_past_m():
    prof = _prof()
    M, N, K = 17, 64, 64
    big_x = torch.full((M + 64, K), float("nan"))  # rows past M are NaN: they must never be read
    x = big_x[:M]
    x.copy_(torch.randn(M, K))
    _, w, b = _inputs(M, N, K, torch.float32)
    big_y = torch.full((M + 64, N), float("nan"))  # rows past M must never be written
    y = sg.smooth_gemm(x, w, b, prof, out=big_y[:M])
    _check(y, x, w, b)
    assert torch.isnan(big_y[M:]).all()
    assert gp.plan_gemm(M, N, K, prof, 4).padded_rows > 0


# ---- rows never influence each other ------------------------------------------------------------
def _numpy_dot_row_invariant(tiles: list[dict], dtype: torch.dtype) -> bool:
    """Whether numpy's matmul (the interpreter's ``tl.dot``) gives a row the same bits whatever
    the tile height: it depends on the host's BLAS kernel (OpenBLAS picks one per CPU)."""
    import numpy as np

    g = np.random.default_rng(0)
    bk = max(t["BLOCK_K"] for t in tiles)
    bn = max(t["BLOCK_N"] for t in tiles)
    heights = sorted({t["BLOCK_M"] for t in tiles} | {1})
    a = g.standard_normal((heights[-1], bk)).astype(np.float32)
    b = g.standard_normal((bk, bn)).astype(np.float32)
    if dtype == torch.float16:  # the interpreter's fp16 dot multiplies the fp16 values in fp32
        a, b = a.astype(np.float16).astype(np.float32), b.astype(np.float16).astype(np.float32)
    full = a @ b
    return all(np.array_equal(a[:m] @ b, full[:m]) for m in heights)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_bit_exact_across_batch_sizes(dtype):
    prof = _prof()
    N, K = 70, 96
    x, w, b = _inputs(300, N, K, dtype)
    # garbage in other rows of the batch cannot leak into a row
    full = sg.smooth_gemm(x, w, b, prof)
    x2 = x.clone()
    x2[1:] = torch.randn(299, K).to(dtype) * 1e4
    assert torch.equal(sg.smooth_gemm(x2, w, b, prof)[0], full[0])
    if not _numpy_dot_row_invariant(prof.gemm["tiles"], dtype):
        pytest.skip("this host's numpy BLAS rounds a row differently by matrix height: under the "
                    "interpreter, invariance across tile heights cannot be checked here")  # fmt: skip
    plans = {m: gp.plan_gemm(m, N, K, prof, x.element_size()) for m in MS}
    # the batch sizes really use different tiles / segmentations
    assert len({tuple(s.tile.name for s in p.segments) for p in plans.values()}) >= 2
    tiles = prof.gemm["tiles"]
    two_seg = sg.smooth_gemm(x, w, b, prof, plan=gp.plan_from_tiles(300, N, K, [tiles[2], tiles[0]], prof))
    assert torch.equal(full, two_seg)
    for m in MS:
        assert torch.equal(sg.smooth_gemm(x[:m], w, b, prof), full[:m]), m
    for i in (0, 5, 150, 299):
        assert torch.equal(sg.smooth_gemm(x[i : i + 1], w, b, prof)[0], full[i]), i


# ---- planner properties (pure Python, fast) -----------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    prof_i=st.integers(0, len(ALL_PROFILES) - 1),
    M=st.integers(0, 5000),
    N=st.sampled_from([64, 80, 384, 1024, 4096, 11008, 49152]),
    K=st.sampled_from([64, 96, 896, 4096]),
    eb=st.sampled_from([2, 4]),
)
def test_plan_properties(prof_i, M, N, K, eb):
    prof = load_profile(*ALL_PROFILES[prof_i])
    plan = gp.plan_gemm(M, N, K, prof, eb)
    assert gp.plan_gemm(M, N, K, prof, eb) is plan  # cached
    menu = set(gp.menu(prof))
    assert len(plan.segments) <= prof.gemm.get("max_segments", 2)
    start = 0
    for i, s in enumerate(plan.segments):
        assert s.tile in menu and s.m_start == start and s.m_rows > 0
        assert s.tiles_m == math.ceil(s.m_rows / s.tile.BLOCK_M) and s.tiles_n == math.ceil(N / s.tile.BLOCK_N)
        if i < len(plan.segments) - 1:
            assert s.padded_rows == 0  # only the tail pads ...
        assert 0 <= s.padded_rows < s.tile.BLOCK_M  # ... and by less than one tile
        start += s.m_rows
    assert start == M
    assert plan.padded_rows < max(t.BLOCK_M for t in menu)
    assert plan.useful_macs == M * N * K and plan.executed_macs >= plan.useful_macs
    assert 0 < plan.efficiency <= 1
    # optimal within the cost model, up to the 2 % tie band
    for t in menu:
        single = gp.single_tile_plan(M, N, K, t, prof, eb)
        assert plan.est_time_s <= single.est_time_s * 1.02 + 1e-15


def test_plan_examples():
    sm90 = load_profile("cuda", "sm90")
    decode = gp.plan_gemm(1, 4096, 4096, sm90)
    assert decode.segments[0].tile.BLOCK_M == 16  # decode stays on the smallest tile
    big = gp.plan_gemm(4096, 4096, 4096, sm90)
    assert big.padded_rows == 0 and big.segments[0].tile.BLOCK_M == 128
    p = gp.plan_gemm(300, 80, 96, _prof(), 4)
    assert p.executed_macs == sum(s.tiles_m * s.tile.BLOCK_M * s.tiles_n * s.tile.BLOCK_N * 96 for s in p.segments)


@pytest.mark.parametrize("vendor,arch", ALL_PROFILES)
def test_shipped_menus_are_valid(vendor, arch):
    prof = load_profile(vendor, arch)
    assert gp.menu_problems(prof) == []
    if vendor == "ascend":
        for t in gp.menu(prof):
            assert t.live_bytes(2) <= 96 * 1024 and "num_warps" not in t.launch_options
            assert t.launch_options.get("multibuffer") is True
        assert prof.gemm["persistent"] and prof.data["num_cores_from"] == "num_aicore"
    if vendor == "cuda":
        assert all("num_warps" in t.launch_options and "num_stages" in t.launch_options for t in gp.menu(prof))
    dev = prof.data.get("device") or {}
    if vendor != "interpret":
        assert dev["peak_gbps"] > 0 and dev["peak_tflops"]["fp16"] > 0


def test_menu_problems_flags_bad_tiles():
    bad = _prof(tiles=[{"BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 32}, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}])
    probs = gp.menu_problems(bad)
    assert any("BLOCK_M=8" in p for p in probs) and any("mixes BLOCK_K" in p for p in probs)
    asc = load_profile("ascend")
    huge = dataclasses.replace(asc, data={**asc.data, "gemm": {**asc.gemm, "tiles": [
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128}]}})  # fmt: skip
    assert any("budget" in p for p in gp.menu_problems(huge))


def test_empty_and_bad_shapes():
    prof = _prof()
    w = torch.randn(8, 16)
    assert sg.smooth_gemm(torch.randn(0, 16), w, None, prof).shape == (0, 8)
    with pytest.raises(ValueError):
        sg.smooth_gemm(torch.randn(3, 15), w, None, prof)
    with pytest.raises(TypeError):
        sg.smooth_gemm(torch.randn(3, 16), w.half(), None, prof)


def test_aot_specs_cover_every_argument():
    for vendor, arch in (("cuda", "sm80"), ("cuda", "sm90"), ("ascend", "910b")):
        prof = load_profile(vendor, arch)
        specs = aot_specs.smooth_gemm(prof)
        assert len(specs) == len(gp.menu(prof)) * len(aot_specs.half_dtypes(prof))
        for spec in specs:
            assert spec["expect_tensor_cores"] is True
            names = set(spec["fn"].arg_names)
            assert set(spec["signature"]) | set(spec["constexprs"]) == names
            assert {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"} <= set(spec)
