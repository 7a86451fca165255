"""SmoothGEMM tile plans (host side): the tile menu, virtual padding, and the roofline cost model
that maps a run-time M onto menu tiles. Kernel and wrapper: :mod:`.smooth_gemm`.

Tile plans (host side, :func:`plan_gemm`)
    A plan splits the M rows into at most ``gemm.max_segments`` (default 2) consecutive
    *segments*, each run by one launch with one menu tile: every segment but the last covers a
    whole number of its tiles (no padding), the last one pads its final tile. So a plan never
    pads more than one tile per tail (padding < BLOCK_M of the tail tile). Example with menu
    BLOCK_M in {16, 64} and M = 300: 256 rows on 64-row tiles + 44 rows on 16-row tiles (4 rows
    of virtual padding) instead of 5 x 64 (20 rows) or 19 x 16 (more, smaller tiles).

    Cost model (the roofline of ``backends/roofline.py`` per wave, :func:`gemm_waves_time`;
    XY-Serve profiles offline instead, so a tuned profile may replace this by listing fewer
    tiles). For a segment of R rows on tile
    (BM, BN, BK) and C = ``num_cores``::

        tiles  = ceil(R / BM) * ceil(N / BN)          waves = ceil(tiles / C)
        per wave: t = max(2 * BM * BN * K / (peak_flops / C),           # padded rows ARE computed
                          w * (rows_w + BN) * K * bytes / bw(w))        # but never read (selective read)
                  bw(w) = min(peak_bw, w * core_bw_share * peak_bw / C)  # few busy cores pull less
        segment time = sum over waves of (t + tile_overhead) + launch_overhead
    where ``w`` is the number of tiles in the wave and ``rows_w`` the real rows of a tile;
    ``core_bw_share`` (default 2: one core can pull twice its fair share of HBM bandwidth) is an
    assumption, settable in ``gemm.core_bw_share``; ``gemm.tile_overhead_us`` (prologue, pipeline
    fill, epilogue of one tile) and ``gemm.launch_overhead_us`` are profile data too. Plans within
    2 % of the cheapest count as equal; among those the fewest executed MACs (least padding), then
    the fewest segments win.
    Peaks come from the profile's ``device`` section (placeholders when absent). Plans are
    cached per (M, N, K, dtype size) and profile.

Bit-exactness across batch sizes
    Within a launch rows never interact. Across launches with different tiles, row ``i`` gets the
    same bits iff the tiles share BLOCK_K (same K-block order, fp32 accumulation) and the dot
    instruction accumulates each element in a shape-independent way: true under the Triton
    interpreter (tested: row ``i`` for M = 1 equals row ``i`` for M = 300). All shipped menus share
    one BLOCK_K per profile (:func:`menu_problems` checks it). On GPUs different BLOCK_M can pick
    different MMA instructions (mma.sync for 16/32 rows, wgmma for >= 64 on sm90), whose internal
    rounding is not documented to agree, so hardware bit-exactness across M is NOT claimed.

Plans expose ``useful_macs`` (M*N*K) and ``executed_macs`` (every launched tile in full,
including padded rows, columns and K tail) for the padding-efficiency analysis.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..backends.roofline import gemm_waves_time, peaks

_BLOCK_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


@dataclass(frozen=True)
class GemmTile:
    """One menu entry. ``options`` are launch/compile options passed through to the launch:
    ``num_warps``/``num_stages`` on CUDA, ``multibuffer`` & co. on Ascend."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> GemmTile:
        missing = [k for k in _BLOCK_KEYS if k not in d]
        if missing:
            raise ValueError(f"gemm tile {d} lacks {missing}")
        opts = tuple(sorted((k, v) for k, v in d.items() if k not in _BLOCK_KEYS))
        return cls(int(d["BLOCK_M"]), int(d["BLOCK_N"]), int(d["BLOCK_K"]), opts)

    @property
    def launch_options(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def num_warps(self) -> int:
        return int(self.launch_options.get("num_warps", 4))

    @property
    def num_stages(self) -> int:
        return int(self.launch_options.get("num_stages", 2))

    @property
    def name(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N}x{self.BLOCK_K}"

    def live_bytes(self, elem_bytes: int = 2) -> int:
        """On-chip bytes live at once: one A and one B tile (inputs) plus the fp32 accumulator.
        The Ascend compiler double-buffers the inputs itself, so this must stay within half the
        unified buffer (``onchip.live_budget_bytes``, 96 KB on 910B)."""
        bm, bn, bk = self.BLOCK_M, self.BLOCK_N, self.BLOCK_K
        return (bm * bk + bn * bk) * elem_bytes + bm * bn * 4


@dataclass(frozen=True)
class GemmSegment:
    """Rows ``m_start : m_start + m_rows`` computed by one launch of ``tile``."""

    m_start: int
    m_rows: int
    tile: GemmTile
    tiles_m: int
    tiles_n: int
    programs: int  # launched grid size (== tiles unless persistent)

    @property
    def num_tiles(self) -> int:
        return self.tiles_m * self.tiles_n

    @property
    def padded_rows(self) -> int:
        return self.tiles_m * self.tile.BLOCK_M - self.m_rows


@dataclass(frozen=True)
class GemmPlan:
    M: int
    N: int
    K: int
    segments: tuple[GemmSegment, ...]
    num_cores: int
    persistent: bool
    group_m: int
    est_time_s: float = 0.0
    candidates: int = field(default=0, compare=False)

    @property
    def useful_macs(self) -> int:
        return self.M * self.N * self.K

    @property
    def executed_macs(self) -> int:
        """MACs the tiles perform, padding included (rows, N tail, K tail)."""
        total = 0
        for s in self.segments:
            t = s.tile
            k_pad = math.ceil(self.K / t.BLOCK_K) * t.BLOCK_K
            total += s.tiles_m * t.BLOCK_M * s.tiles_n * t.BLOCK_N * k_pad
        return total

    @property
    def efficiency(self) -> float:
        return self.useful_macs / self.executed_macs if self.executed_macs else 1.0

    @property
    def padded_rows(self) -> int:
        return sum(s.padded_rows for s in self.segments)

    @property
    def waves(self) -> int:
        return sum(math.ceil(s.num_tiles / self.num_cores) for s in self.segments)

    def describe(self) -> str:
        segs = " + ".join(f"{s.m_rows}r@{s.tile.name}" for s in self.segments)
        return (f"M={self.M} N={self.N} K={self.K}: {segs} | waves={self.waves} pad_rows={self.padded_rows} "
                f"eff={self.efficiency:.3f}")  # fmt: skip


def menu(profile) -> list[GemmTile]:
    tiles = [GemmTile.from_dict(t) for t in profile.gemm["tiles"]]
    if not tiles:
        raise ValueError("profile gemm.tiles is empty")
    return tiles


def menu_problems(profile, elem_bytes: int = 2) -> list[str]:
    """Static checks of a profile's tile menu: ``tl.dot`` needs dims >= 16, tiles are powers of
    two, one BLOCK_K for the whole menu (bit-exact rows across plans), and -- where the profile
    has an ``onchip`` section (Ascend) -- 16-element alignment and the live-tile budget."""
    out = []
    tiles = menu(profile)
    for t in tiles:
        for k in _BLOCK_KEYS:
            v = getattr(t, k)
            if v < 16 or v & (v - 1):
                out.append(f"{t.name}: {k}={v} must be a power of two >= 16")
    if len({t.BLOCK_K for t in tiles}) > 1:
        out.append(f"menu mixes BLOCK_K {sorted({t.BLOCK_K for t in tiles})}: rows would differ across plans")
    onchip = profile.data.get("onchip")
    if onchip:
        budget = int(onchip.get("live_budget_bytes", 0))
        align = int(onchip.get("align_elems", 16))
        for t in tiles:
            if budget and t.live_bytes(elem_bytes) > budget:
                out.append(f"{t.name}: {t.live_bytes(elem_bytes)} live bytes > budget {budget}")
            if any(getattr(t, k) % align for k in _BLOCK_KEYS):
                out.append(f"{t.name}: not {align}-element aligned")
    return out


def _chains(tiles: list[GemmTile], max_segments: int):
    """Tile sequences with strictly decreasing BLOCK_M (body first, tail last)."""
    by_m = sorted(tiles, key=lambda t: -t.BLOCK_M)

    def rec(start, prefix):
        if prefix:
            yield list(prefix)
        if len(prefix) == max_segments:
            return
        for i in range(start, len(by_m)):
            t = by_m[i]
            if prefix and t.BLOCK_M >= prefix[-1].BLOCK_M:
                continue
            yield from rec(i + 1, prefix + [t])

    yield from rec(0, [])


_PLAN_CACHE: dict[tuple, GemmPlan] = {}


def _profile_key(profile) -> str:
    key = getattr(profile, "_smooth_gemm_key", None)
    if key is None:
        payload = {"gemm": profile.gemm, "device": profile.data.get("device"), "cores": profile.num_cores}
        key = json.dumps(payload, sort_keys=True, default=str)
        try:
            profile._smooth_gemm_key = key
        except AttributeError:
            pass
    return key


def plan_from_tiles(M: int, N: int, K: int, tiles, profile, elem_bytes: int = 2) -> GemmPlan | None:
    """The plan that runs ``tiles`` (menu entries or dicts) body first: every tile but the last
    takes as many whole tiles of rows as fit, the last one takes the rest (padding its final
    tile). None when a body tile would get no rows. Costed with the module's model."""
    tiles = [GemmTile.from_dict(t) if isinstance(t, dict) else t for t in tiles]
    g = profile.gemm
    cores = max(1, int(profile.num_cores))
    persistent = bool(g.get("persistent", False))
    device = peaks(profile, elem_bytes)
    overhead = float(g.get("launch_overhead_us", 5.0)) * 1e-6
    share = float(g.get("core_bw_share", 2.0))
    tile_oh = float(g.get("tile_overhead_us", 0.5)) * 1e-6
    segs, start, cost, rest = [], 0, 0.0, M
    for i, tile in enumerate(tiles):
        rows = rest if i == len(tiles) - 1 else (rest // tile.BLOCK_M) * tile.BLOCK_M
        if rows == 0:
            if M == 0:
                break
            return None
        block = (tile.BLOCK_M, tile.BLOCK_N, tile.BLOCK_K)
        t, tm, tn = gemm_waves_time(rows, N, K, block, cores, device, elem_bytes, share, tile_oh)
        progs = min(cores, tm * tn) if persistent else tm * tn
        segs.append(GemmSegment(start, rows, tile, tm, tn, progs))
        cost += t + overhead
        start, rest = start + rows, rest - rows
    return GemmPlan(M, N, K, tuple(segs), cores, persistent, int(g.get("group_m", 1)), cost)


def plan_gemm(M: int, N: int, K: int, profile, elem_bytes: int = 2, objective: str = "time") -> GemmPlan:
    """Pick (and cache) the tile plan for an ``[M, K] x [N, K]^T`` GEMM; see the module doc.
    ``objective="padding"``: the plan with the fewest executed MACs, then the cheapest (for GEMMs
    that share one launch with others, e.g. the experts of a fused MoE, where the cost of a plan
    alone on the device does not say what it costs within the launch)."""
    if M < 0 or N <= 0 or K <= 0:
        raise ValueError(f"bad GEMM shape M={M} N={N} K={K}")
    if objective not in ("time", "padding"):
        raise ValueError(f"plan objective must be 'time' or 'padding', got {objective!r}")
    ck = (_profile_key(profile), M, N, K, elem_bytes, objective)
    plan = _PLAN_CACHE.get(ck)
    if plan is not None:
        return plan
    max_segments = max(1, int(profile.gemm.get("max_segments", 2)))
    cands = []
    for chain in _chains(menu(profile), max_segments):
        cand = plan_from_tiles(M, N, K, chain, profile, elem_bytes)
        if cand is not None:  # None: a body tile got no rows (a shorter chain is the same plan)
            cands.append(cand)
    if objective == "padding":
        best = min(cands, key=lambda c: (c.executed_macs, c.est_time_s, len(c.segments)))
    else:
        cheapest = min(c.est_time_s for c in cands)
        near = [c for c in cands if c.est_time_s <= cheapest * 1.02]
        best = min(near, key=lambda c: (c.executed_macs, len(c.segments), c.est_time_s))
    best = dataclasses.replace(best, candidates=len(cands))
    _PLAN_CACHE[ck] = best
    return best


def single_tile_plan(M: int, N: int, K: int, tile: GemmTile | dict, profile, elem_bytes: int = 2) -> GemmPlan:
    """A plan that runs all M rows on one given tile (tests and tile sweeps)."""
    return plan_from_tiles(M, N, K, [tile], profile, elem_bytes)
