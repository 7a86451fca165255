"""``portable-xy bench padding``: the aggregated executed / useful MACs, row padding and kernel counts
agree with a brute-force count over the plans' tiles; the fixed tile; the written report."""

from __future__ import annotations

import math

import pytest

from portable_xy.cli import main
from portable_xy.tools.bench.padding import analyse_profile, fixed_tile, load_shipped
from portable_xy.tools.bench.shapes import gemm_shapes
from portable_xy.triton_kernels.gemm_plan import menu as menu_tiles
from portable_xy.triton_kernels.gemm_plan import plan_gemm

M_MAX = 48


def _ceil(a: int, b: int) -> int:
    return math.ceil(a / b) * b


def _least(M: int, N: int, K: int, tiles) -> int:
    """Fewest executed MACs over one tile, or a taller body tile on whole tiles + a shorter tail tile."""

    def macs(rows, t):
        return _ceil(rows, t.BLOCK_M) * _ceil(N, t.BLOCK_N) * _ceil(K, t.BLOCK_K)

    best = min(macs(M, t) for t in tiles)
    for body in tiles:
        for tail in tiles:
            rows = M // body.BLOCK_M * body.BLOCK_M
            if tail.BLOCK_M < body.BLOCK_M and rows:
                best = min(best, macs(rows, body) + macs(M - rows, tail))
    return best


@pytest.mark.parametrize("name", ["cuda/sm90", "cuda/sm80", "ascend/910b"])
def test_aggregates_match_brute_force(name):
    shapes = gemm_shapes("qwen2-7b")
    stats = analyse_profile(name, shapes, M_MAX)
    profile = load_shipped(name)
    fx = fixed_tile(profile)
    assert (fx.BLOCK_M, fx.BLOCK_N) == ((128, 64) if name == "ascend/910b" else (128, 128))
    tot = {"useful": 0, "menu": 0, "least": 0, "fixed": 0, "menu_rows": 0, "fixed_rows": 0, "rows": 0}
    ratios_menu, ratios_fixed, tiles = [], [], set()
    at_m = {"menu": [0] * M_MAX, "fixed": [0] * M_MAX, "useful": [0] * M_MAX}  # per M, over the shapes
    assert [st.shape for st in stats.shapes] == shapes
    for shape in shapes:
        nk = shape.N * shape.K
        for M in range(1, M_MAX + 1):
            plan = plan_gemm(M, shape.N, shape.K, profile)
            assert sum(s.m_rows for s in plan.segments) == M
            menu = sum(
                _ceil(s.m_rows, s.tile.BLOCK_M) * _ceil(shape.N, s.tile.BLOCK_N) * _ceil(shape.K, s.tile.BLOCK_K)
                for s in plan.segments
            )
            fixed = _ceil(M, 128) * _ceil(shape.N, fx.BLOCK_N) * _ceil(shape.K, fx.BLOCK_K)
            useful = M * shape.N * shape.K
            tot["useful"] += useful
            tot["menu"] += menu
            tot["least"] += _least(M, shape.N, shape.K, menu_tiles(profile))
            tot["fixed"] += fixed
            tot["menu_rows"] += sum(_ceil(s.m_rows, s.tile.BLOCK_M) for s in plan.segments) * nk
            tot["fixed_rows"] += _ceil(M, 128) * nk
            tot["rows"] += M * nk
            for key, val in (("menu", menu), ("fixed", fixed), ("useful", useful)):
                at_m[key][M - 1] += val
            ratios_menu.append(menu / useful)
            ratios_fixed.append(fixed / useful)
            tiles.update((s.tile.BLOCK_M, s.tile.BLOCK_N, s.tile.BLOCK_K) for s in plan.segments)
    assert stats.menu_weighted == pytest.approx(tot["menu"] / tot["useful"], rel=1e-12)
    assert stats.fixed_weighted == pytest.approx(tot["fixed"] / tot["useful"], rel=1e-12)
    assert stats.least_weighted == pytest.approx(tot["least"] / tot["useful"], rel=1e-12)
    assert stats.least_weighted <= min(stats.menu_weighted, stats.fixed_weighted)
    assert stats.menu_mean == pytest.approx(sum(ratios_menu) / len(ratios_menu), rel=1e-12)
    assert stats.fixed_mean == pytest.approx(sum(ratios_fixed) / len(ratios_fixed), rel=1e-12)
    assert stats.menu_rows == pytest.approx(tot["menu_rows"] / tot["rows"], rel=1e-12)
    assert stats.fixed_rows == pytest.approx(tot["fixed_rows"] / tot["rows"], rel=1e-12)
    assert stats.menu_kernels == len(tiles) >= 2
    for key in ("menu", "fixed"):
        want = [e / u for e, u in zip(at_m[key], at_m["useful"])]
        assert stats.curve_at(f"{key}_curve") == pytest.approx(want, rel=1e-12)
    # for small M the menu pads far less than a 128-row tile
    assert stats.menu_mean < stats.fixed_mean and stats.menu_rows < stats.fixed_rows


def test_cli_writes_report_and_small_plots(tmp_path):
    args = ["bench", "padding", "--profile", "cuda/sm90", "--profile", "ascend/910b", "--models", "llama2-7b",
            "--m-max", "32", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    md = (tmp_path / "padding.md").read_text()
    stats = analyse_profile("cuda/sm90", gemm_shapes("llama2-7b"), 32)
    lines = md.splitlines()
    head = next(line for line in lines if line.startswith("| profile | menu"))
    row = next(line for line in lines if line.startswith("| cuda/sm90 |"))
    cells = dict(zip(*([c.strip() for c in r.strip("|").split("|")] for r in (head, row))))
    assert cells["MAC-weighted: menu"] == f"{stats.menu_weighted:.4f}"
    assert cells["MAC-weighted: least"] == f"{stats.least_weighted:.4f}"
    assert cells["MAC-weighted: fixed"] == f"{stats.fixed_weighted:.4f}"
    assert cells["mean: fixed"] == f"{stats.fixed_mean:.3f}"
    assert (cells["kernels: menu"], cells["kernels: fixed"]) == (str(stats.menu_kernels), "1")
    for shape in gemm_shapes("llama2-7b"):
        assert f"| {shape.name} | {shape.N} | {shape.K} |" in md
    for img in ("padding_cuda_sm90.png", "padding_ascend_910b.png"):
        assert f"img/{img}" in md
        assert 0 < (tmp_path / "img" / img).stat().st_size < 100_000


def test_moe_padding_accounting_by_hand():
    """Rows per expert [1, 0, 17, 64]: per-expert 16-row tiles execute 16 + 32 + 64 rows; one
    64-row tile per expert executes 64 + 64 + 64 rows (N, K multiples of every tile: no tails)."""
    from portable_xy.tools.bench.moe_padding import GemmTile, load_shipped, plan_moe_counts

    prof = load_shipped("cuda/sm90")
    counts, n, k = [1, 0, 17, 64], 256, 256
    useful = sum(counts) * n * k * 2
    for bm, rows in ((16, 16 + 32 + 64), (64, 3 * 64)):
        tile = GemmTile(bm, 64, 64)
        plan = plan_moe_counts(counts, (n, k), (n, k), prof, tile=tile)
        assert plan.useful_macs == useful
        assert plan.executed_macs == rows * n * k * 2
    ours = plan_moe_counts(counts, (n, k), (n, k), prof)
    assert ours.useful_macs == useful and ours.executed_macs >= useful


def test_moe_padding_routing_and_report(tmp_path):
    import torch

    from portable_xy.tools.bench import moe_padding as mp

    dims = mp.MOE_MODELS["qwen3-30b-a3b"]
    gen = torch.Generator().manual_seed(0)
    uniform = mp.route_counts(4096, dims, "uniform", gen)
    skewed = mp.route_counts(4096, dims, "skewed", gen)
    for counts in (uniform, skewed):
        assert sum(counts) == 4096 * dims.top_k and max(counts) <= 4096
    assert max(skewed) > 2 * max(uniform)  # Zipf popularity concentrates on the first experts
    path = mp.write_report(str(tmp_path), ["cuda/sm90"])
    text = path.read_text()
    assert "mixtral-8x7b" in text and "qwen3-30b-a3b" in text and text.count("| 4096 |") == 4
