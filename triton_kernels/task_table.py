"""Host side of Meta-Attention: the step's token table -> a task table dealt to cores.

XY-Serve's decomposition (digest section 3): every stage (a prefill chunk, a decode, a verify)
is cut into query tiles whose size comes from the profile's tile menu; a *unit* is one
(stage, query tile, KV head) triple. Units are sorted by cost = tile rows x KV length and dealt
to the profile's core count in snake (boustrophedon) order: cores 0..C-1, then C-1..0, ...
The kernel walks its core's units (a persistent grid of ``num_cores`` programs).

GQA: the query heads sharing one KV head are packed into the tile's rows, so a tile of ``R`` rows
holds ``R // group`` query tokens of ``group`` heads each, and every K/V load serves them all.
Pure host code: no Triton import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNIT_FIELDS = ("stage", "tok_start", "n_tok", "kv_head", "kv_lo", "kv_hi", "split")


@dataclass
class TaskTable:
    """``units``: int32 ``[U, 7]`` rows of :data:`UNIT_FIELDS` (``tok_start`` relative to the
    stage's first query row; ``[kv_lo, kv_hi)`` the KV columns the unit reads; ``split`` its
    split-KV slot). Core ``c`` owns units ``core_offsets[c]:core_offsets[c+1]``."""

    units: torch.Tensor
    core_offsets: torch.Tensor
    block_m: int  # the launch's query-tile rows (largest tile used by any stage)
    tile_rows: list[int]  # per stage, from the profile menu
    costs: list[int]  # per unit, in table order
    num_splits: int = 1

    @property
    def num_cores(self) -> int:
        return self.core_offsets.numel() - 1

    def core_costs(self) -> list[int]:
        offs = self.core_offsets.tolist()
        return [sum(self.costs[offs[c] : offs[c + 1]]) for c in range(self.num_cores)]


def choose_tile(rows: int, menu: list[int]) -> int:
    """Smallest menu tile holding ``rows`` query rows; the largest tile when none does."""
    fits = [t for t in sorted(menu) if t >= rows]
    return fits[0] if fits else max(menu)


def snake_order(num_units: int, num_cores: int) -> list[int]:
    """Core of the i-th unit when dealt 0..C-1, C-1..0, 0..C-1, ..."""
    out = []
    for i in range(num_units):
        r, k = divmod(i, num_cores)
        out.append(k if r % 2 == 0 else num_cores - 1 - k)
    return out


def build_task_table(
    query_lens: list[int],
    seq_lens: list[int],
    num_kv_heads: int,
    group: int,
    q_tiles: list[int],
    num_cores: int,
    num_splits: int = 1,
    kv_tile: int = 16,
    device: torch.device | str = "cpu",
) -> TaskTable:
    """Decompose stages into units and deal them to ``num_cores`` cores.

    ``num_splits > 1`` (decode-only steps) also splits each stage's KV range into that many
    ``kv_tile``-aligned pieces whose partial softmax results a reduce kernel combines.
    """
    if max(q_tiles) < group:
        raise ValueError(f"attention q_tiles {q_tiles} cannot hold one token of {group} GQA heads")
    if num_splits > 1 and any(q != 1 for q in query_lens):
        raise ValueError("split-KV attention is for decode-only steps (every query length 1)")
    rows: list[tuple[int, ...]] = []
    costs: list[int] = []
    tiles = []
    for s, (q_len, kv_len) in enumerate(zip(query_lens, seq_lens)):
        tile = choose_tile(q_len * group, q_tiles)
        tiles.append(tile)
        per_unit = tile // group
        # cost model of the paper: tile rows x KV length (the kernel itself stops a causal
        # unit at its last token's column)
        pieces = _split_range(kv_len, num_splits, kv_tile)
        for t0 in range(0, q_len, per_unit):
            n = min(per_unit, q_len - t0)
            for h in range(num_kv_heads):
                for split, (lo, hi) in enumerate(pieces):
                    rows.append((s, t0, n, h, lo, hi, split))
                    costs.append(tile * max(hi - lo, 1))
    order = sorted(range(len(rows)), key=lambda i: -costs[i])  # stable: ties keep stage order
    cores = snake_order(len(order), num_cores)
    per_core: list[list[int]] = [[] for _ in range(num_cores)]
    for rank, i in enumerate(order):
        per_core[cores[rank]].append(i)
    flat = [i for c in per_core for i in c]
    offsets = [0]
    for c in per_core:
        offsets.append(offsets[-1] + len(c))
    units = torch.tensor([rows[i] for i in flat], dtype=torch.int32).reshape(-1, len(UNIT_FIELDS))
    return TaskTable(
        units=units.to(device),
        core_offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
        block_m=max(tiles, default=min(q_tiles)),
        tile_rows=tiles,
        costs=[costs[i] for i in flat],
        num_splits=num_splits,
    )


def _split_range(length: int, num_splits: int, align: int) -> list[tuple[int, int]]:
    """``num_splits`` consecutive ``[lo, hi)`` pieces of ``[0, length)``, cut at multiples of
    ``align`` (trailing pieces may be empty)."""
    if num_splits <= 1:
        return [(0, length)]
    step = -(-length // num_splits)
    step = -(-step // align) * align
    return [(min(i * step, length), min((i + 1) * step, length)) for i in range(num_splits)]
