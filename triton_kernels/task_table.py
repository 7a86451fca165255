"""Host side of Meta-Attention: the step's token table -> a task table dealt to cores.

XY-Serve's decomposition (digest section 3): every stage (a prefill chunk, a decode, a verify)
is cut into query tiles whose size comes from the profile's tile menu; a *unit* is one
(stage, query tile, KV head) triple (plus a KV range when split-KV is on). Units are sorted by
cost = tile rows x KV length (the paper's load model) and dealt to the profile's core count in
snake (boustrophedon) order: cores 0..C-1, then C-1..0, ... The kernel walks its core's units
(a persistent grid of ``num_cores`` programs).

Tile choice: a stage of ``q`` tokens has ``q * group`` query rows (see GQA below); its tile is
the smallest menu entry holding them, and a stage bigger than the largest tile is cut into
largest-tile pieces (the last piece may be partly empty).

GQA: the ``group`` query heads sharing one KV head are packed into the tile's M dimension, so a
tile of ``R`` rows holds ``R // group`` query tokens x ``group`` heads (row = token * group +
head) and every K/V load serves all of them. A decode of a model with 4 query heads per KV head
therefore fills 4 rows of a 16-row tile.

Pure host code (torch + Python, no Triton import), run once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNIT_FIELDS = ("stage", "tok_start", "n_tok", "kv_head", "kv_lo", "kv_hi", "split", "tile_m")
MAX_LAUNCH_TILES = 4  # query-tile sizes one kernel launch runs (its constexprs M_TILE0..M_TILE3)
RUNTIME_KV = -1  # a unit's kv_hi: the kernel cuts its KV piece from the stage's run-time length


@dataclass
class TaskTable:
    """The step's task table.

    ``units``: int32 ``[U, 8]``, one row of :data:`UNIT_FIELDS` per unit: ``stage``; ``tok_start``
    and ``n_tok``, the unit's query tokens relative to the stage's first query row; ``kv_head``;
    ``[kv_lo, kv_hi)``, the KV columns it reads (the whole stage unless split-KV), or ``kv_hi =
    -1`` (:data:`RUNTIME_KV`): piece ``split`` of ``num_splits`` of the stage's *run-time* KV
    length, cut as :func:`split_range` cuts it (fixed decode plans, see
    :func:`build_decode_task_table`); ``split``, its split-KV slot; ``tile_m``, its query-tile
    rows (a ``tile_menu`` entry).
    ``segments``: int32 ``[num_cores * MAX_LAUNCH_TILES + 1]``; core ``c`` runs, for each launch
    tile ``k`` (``launch_tiles[k]``, see :func:`launch_tiles`), the units
    ``units[segments[c * MAX_LAUNCH_TILES + k] : segments[c * MAX_LAUNCH_TILES + k + 1]]`` in
    that tile size (a core's units are contiguous, grouped by launch tile, costliest first).
    """

    units: torch.Tensor
    segments: torch.Tensor
    launch_tiles: tuple[int, int, int, int]
    tile_menu: list[int]  # the menu entries up to the largest one used (the kernel's constexprs)
    tile_rows: list[int]  # per stage, from the menu
    costs: list[int]  # per unit, in table order
    num_splits: int = 1

    @property
    def block_m(self) -> int:
        """The largest query tile of the step."""
        return self.tile_menu[-1]

    @property
    def num_cores(self) -> int:
        return (self.segments.numel() - 1) // MAX_LAUNCH_TILES

    def core_offsets(self) -> list[int]:
        """``[num_cores + 1]``: core ``c`` owns units ``offsets[c]:offsets[c + 1]``."""
        return self.segments.tolist()[::MAX_LAUNCH_TILES]

    def core_costs(self) -> list[int]:
        offs = self.core_offsets()
        return [sum(self.costs[offs[c] : offs[c + 1]]) for c in range(self.num_cores)]


def choose_tile(rows: int, menu: list[int]) -> int:
    """Smallest menu tile holding ``rows`` query rows; the largest tile when none does."""
    fits = [t for t in sorted(menu) if t >= rows]
    return fits[0] if fits else max(menu)


def launch_tiles(tile_menu: list[int]) -> tuple[int, int, int, int]:
    """The launch's query tiles for a step whose units use menu tiles up to ``tile_menu[-1]``:
    the (at most four largest) entries, ascending, the last repeated. A unit runs in the smallest
    of them holding its rows, so dropping small entries is safe."""
    tiles = list(tile_menu[-MAX_LAUNCH_TILES:])
    tiles += [tiles[-1]] * (MAX_LAUNCH_TILES - len(tiles))
    return tuple(tiles)  # type: ignore[return-value]


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
    runtime_kv: bool = False,
) -> TaskTable:
    """Decompose the stages (``query_lens[s]`` new tokens, ``seq_lens[s]`` = history + new KV
    columns) into units for ``num_kv_heads`` KV heads of ``group`` query heads each, tiles from
    the menu ``q_tiles``, and deal them to ``num_cores`` cores.

    ``num_splits > 1`` (decode-only steps) also cuts each stage's KV range into that many
    ``kv_tile``-aligned pieces whose partial softmax results a reduce kernel combines.
    ``runtime_kv``: units carry ``kv_lo = 0, kv_hi = RUNTIME_KV`` instead of their piece (the
    kernel cuts it from the run-time length); ``seq_lens`` then only drive the costs.
    """
    menu = sorted(set(int(t) for t in q_tiles))
    if not menu or menu[-1] < group:
        raise ValueError(f"attention q_tiles {q_tiles} cannot hold one token of {group} GQA heads")
    if num_splits > 1 and any(q != 1 for q in query_lens):
        raise ValueError("split-KV attention is for decode-only steps (every query length 1)")
    rows: list[tuple[int, ...]] = []
    costs: list[int] = []
    tiles = []
    for s, (q_len, kv_len) in enumerate(zip(query_lens, seq_lens)):
        tile = choose_tile(q_len * group, menu)
        tiles.append(tile)
        per_unit = tile // group
        pieces = split_range(kv_len, num_splits, kv_tile)
        for t0 in range(0, q_len, per_unit):
            n = min(per_unit, q_len - t0)
            for h in range(num_kv_heads):
                for split, (lo, hi) in enumerate(pieces):
                    kv = (0, RUNTIME_KV) if runtime_kv else (lo, hi)
                    rows.append((s, t0, n, h, *kv, split, tile))
                    costs.append(tile * max(hi - lo, 1))
    order = sorted(range(len(rows)), key=lambda i: -costs[i])  # stable: ties keep stage order
    cores = snake_order(len(order), num_cores)
    top = max(tiles, default=menu[0])
    tile_menu = [t for t in menu if t <= top]
    ltiles = launch_tiles(tile_menu)
    # per core and launch tile: the units, costliest first
    segs: list[list[list[int]]] = [[[] for _ in range(MAX_LAUNCH_TILES)] for _ in range(num_cores)]
    for rank, i in enumerate(order):
        k = min(j for j, m in enumerate(ltiles) if m >= rows[i][7])
        segs[cores[rank]][k].append(i)
    flat = [i for core in segs for seg in core for i in seg]
    segments = [0]
    for core in segs:
        for seg in core:
            segments.append(segments[-1] + len(seg))
    units = torch.tensor([rows[i] for i in flat], dtype=torch.int32).reshape(-1, len(UNIT_FIELDS))
    return TaskTable(
        units=units.to(device),
        segments=torch.tensor(segments, dtype=torch.int32).to(device),
        launch_tiles=ltiles,
        tile_menu=tile_menu,
        tile_rows=tiles,
        costs=[costs[i] for i in flat],
        num_splits=num_splits,
    )


def choose_num_splits(
    query_lens: list[int], seq_lens: list[int], num_kv_heads: int, num_cores: int, max_seqs: int, max_splits: int,
    kv_tile: int,
) -> int:  # fmt: skip
    """Split-KV factor for a step: > 1 only for decode-only steps of at most ``max_seqs``
    sequences whose ``S x num_kv_heads`` units leave cores idle; then just enough splits to give
    every core a unit (at most ``max_splits``, and no more than the longest sequence has
    ``kv_tile`` tiles)."""
    n = len(query_lens)
    if max_splits <= 1 or n == 0 or n > max_seqs or any(q != 1 for q in query_lens):
        return 1
    units = n * num_kv_heads
    if units >= num_cores:
        return 1
    want = -(-num_cores // units)
    longest = -(-max(seq_lens) // kv_tile)
    return max(1, min(want, max_splits, longest))


def build_decode_task_table(
    batch_size: int,
    max_seq_len: int,
    num_kv_heads: int,
    group: int,
    q_tiles: list[int],
    num_cores: int,
    num_splits: int = 1,
    kv_tile: int = 16,
    device: torch.device | str = "cpu",
) -> TaskTable:
    """The fixed task table of a decode-only step of ``batch_size`` stages (query length 1, KV
    length up to ``max_seq_len``): its tensors' shapes and contents depend only on the arguments,
    never on the step's lengths, which the kernel reads at run time (a graph-captured launch
    replays it for any lengths). Every unit's KV piece is cut from the stage's run-time length
    (``runtime_kv``), so a short sequence costs little and its splits stay balanced."""
    return build_task_table(
        [1] * batch_size, [max_seq_len] * batch_size, num_kv_heads, group, q_tiles, num_cores,
        num_splits=num_splits, kv_tile=kv_tile, device=device, runtime_kv=True,
    )  # fmt: skip


def split_range(length: int, num_splits: int, align: int) -> list[tuple[int, int]]:
    """``num_splits`` consecutive ``[lo, hi)`` pieces of ``[0, length)``, cut at multiples of
    ``align`` (trailing pieces may be empty)."""
    if num_splits <= 1:
        return [(0, length)]
    step = -(-length // num_splits)
    step = -(-step // align) * align
    return [(min(i * step, length), min((i + 1) * step, length)) for i in range(num_splits)]
