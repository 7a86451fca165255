"""Task-table properties (host code, no Triton): exact coverage of every (token, query head),
tile choice from the menu, snake dealing's load balance, split-KV pieces and split choice."""

from hypothesis import given, settings
from hypothesis import strategies as st

from portable_xy.triton_kernels.task_table import (
    MAX_LAUNCH_TILES,
    UNIT_FIELDS,
    build_task_table,
    choose_num_splits,
    choose_tile,
    launch_tiles,
    snake_order,
)

stage = st.tuples(st.integers(0, 300), st.integers(0, 500))  # (query length, history)
MENUS = [[16, 32, 64, 128], [16, 64], [32, 128], [64], [16, 32, 64, 128, 256]]


@settings(max_examples=150, deadline=None)
@given(
    stages=st.lists(stage, min_size=1, max_size=12),
    hkv=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 3, 4, 8]),
    cores=st.integers(1, 24),
    menu=st.sampled_from(MENUS),
)
def test_every_token_and_head_covered_once_and_snake_balance(stages, hkv, group, cores, menu):
    q_lens = [q for q, _ in stages]
    seq_lens = [q + h for q, h in stages]
    t = build_task_table(q_lens, seq_lens, hkv, group, menu, cores)
    assert t.units.shape == (len(t.costs), len(UNIT_FIELDS))
    covered = {}
    for s, t0, n, h, lo, hi, split, tile_m in t.units.tolist():
        assert tile_m == t.tile_rows[s] and tile_m in t.tile_menu
        assert 1 <= n and n * group <= tile_m  # the unit's rows fit its tile
        assert (lo, hi, split) == (0, seq_lens[s], 0)
        for tok in range(t0, t0 + n):
            for g in range(group):
                key = (s, tok, h * group + g)
                covered[key] = covered.get(key, 0) + 1
    want = {(s, tok, qh) for s, q in enumerate(q_lens) for tok in range(q) for qh in range(hkv * group)}
    assert set(covered) == want and set(covered.values()) <= {1}
    # the stage's tile is the smallest menu entry holding its rows (else the largest), and the
    # launch's tiles are the menu up to the largest one used
    for s, q in enumerate(q_lens):
        assert t.tile_rows[s] == choose_tile(q * group, menu)
    assert t.tile_menu == [m for m in sorted(menu) if m <= max(t.tile_rows)]
    # each core's units are contiguous, grouped by launch tile, costliest first in a group
    segs = t.segments.tolist()
    assert segs[0] == 0 and segs[-1] == len(t.costs) and len(segs) == cores * MAX_LAUNCH_TILES + 1
    assert segs == sorted(segs) and t.launch_tiles == launch_tiles(t.tile_menu)
    units = t.units.tolist()
    for i in range(len(segs) - 1):
        k = i % MAX_LAUNCH_TILES
        mine = t.costs[segs[i] : segs[i + 1]]
        assert mine == sorted(mine, reverse=True)
        for u in units[segs[i] : segs[i + 1]]:  # the smallest launch tile holding the unit
            assert u[7] <= t.launch_tiles[k] and (k == 0 or u[7] > t.launch_tiles[k - 1])
    # snake dealing of cost-sorted units: every core within one (largest) unit cost of the mean
    if t.costs:
        loads = t.core_costs()
        mean = sum(loads) / cores
        assert max(abs(x - mean) for x in loads) <= max(t.costs)


def test_snake_order_goes_back_and_forth():
    assert snake_order(10, 4) == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1]


def test_launch_tiles():
    assert launch_tiles([16]) == (16, 16, 16, 16)
    assert launch_tiles([16, 64]) == (16, 64, 64, 64)
    assert launch_tiles([16, 32, 64, 128, 256]) == (32, 64, 128, 256)  # 16-row units run in 32


def test_paper_example_tiles():
    """XY-Serve Fig. 7: P 362 tokens, D, V 53 tokens, D (one head per KV head) -> tiles
    128 x 3, 16, 64, 16: six tiles."""
    t = build_task_table([362, 1, 53, 1], [1318 + 362, 1657, 2036, 1986], 1, 1, [16, 32, 64, 128], 4)
    assert t.tile_rows == [128, 16, 64, 16]
    assert t.units.shape[0] == 6
    assert sorted(t.costs, reverse=True)[0] == 128 * 1680


@given(st.integers(1, 2000), st.integers(2, 8))
def test_split_kv_pieces_cover_the_range(length, splits):
    t = build_task_table([1], [length], 1, 4, [16], 4, num_splits=splits, kv_tile=32)
    pieces = sorted((u[4], u[5]) for u in t.units.tolist())
    assert pieces[0][0] == 0 and pieces[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert all(lo % 32 == 0 for lo, hi in pieces if hi > lo)  # empty trailing pieces do nothing
    assert sorted(u[6] for u in t.units.tolist()) == list(range(splits))


def test_choose_num_splits():
    kw = dict(max_seqs=8, max_splits=8, kv_tile=32)
    assert choose_num_splits([1] * 2, [4096] * 2, 2, 16, **kw) == 4  # 4 units on 16 cores
    assert choose_num_splits([1] * 2, [4096] * 2, 2, 4, **kw) == 1  # cores already busy
    assert choose_num_splits([1] * 2, [40] * 2, 2, 64, **kw) == 2  # only 2 KV tiles to split
    assert choose_num_splits([1] * 2, [4096] * 2, 1, 100, **kw) == 8  # capped by max_splits
    assert choose_num_splits([1] * 9, [4096] * 9, 1, 100, **kw) == 1  # more than max_seqs
    assert choose_num_splits([1, 3], [4096] * 2, 1, 100, **kw) == 1  # not decode-only
