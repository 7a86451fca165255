"""Task-table properties (host code, no Triton): exact coverage of every (token, query head),
tile choice from the menu, and snake dealing's load balance."""

from hypothesis import given, settings
from hypothesis import strategies as st

from portable_xy.triton_kernels.task_table import build_task_table, choose_tile, snake_order

stage = st.tuples(st.integers(1, 300), st.integers(0, 500))  # (query length, history)


@settings(max_examples=150, deadline=None)
@given(
    stages=st.lists(stage, min_size=1, max_size=12),
    hkv=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 3, 4, 8]),
    cores=st.integers(1, 24),
    menu=st.sampled_from([[16, 32, 64, 128], [16, 64], [32, 128], [64]]),
)
def test_every_token_and_head_covered_once_and_snake_balance(stages, hkv, group, cores, menu):
    q_lens = [q for q, _ in stages]
    seq_lens = [q + h for q, h in stages]
    t = build_task_table(q_lens, seq_lens, hkv, group, menu, cores)
    covered = {}
    for s, t0, n, h, lo, hi, split in t.units.tolist():
        assert 1 <= n and n * group <= t.block_m and t.tile_rows[s] <= t.block_m
        assert (lo, hi, split) == (0, seq_lens[s], 0)
        for tok in range(t0, t0 + n):
            for g in range(group):
                key = (s, tok, h * group + g)
                covered[key] = covered.get(key, 0) + 1
    want = {(s, tok, qh) for s, q in enumerate(q_lens) for tok in range(q) for qh in range(hkv * group)}
    assert set(covered) == want and set(covered.values()) == {1}
    # the stage's tile is the smallest menu entry holding its rows (else the largest)
    for s, q in enumerate(q_lens):
        assert t.tile_rows[s] == choose_tile(q * group, menu)
    # snake dealing of cost-sorted units: every core within one (largest) unit cost of the mean
    loads = t.core_costs()
    mean = sum(loads) / cores
    assert max(abs(x - mean) for x in loads) <= max(t.costs)


def test_snake_order_goes_back_and_forth():
    assert snake_order(10, 4) == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1]


@given(st.integers(1, 2000), st.integers(2, 8))
def test_split_kv_pieces_cover_the_range(length, splits):
    t = build_task_table([1], [length], 1, 4, [16], 4, num_splits=splits, kv_tile=32)
    pieces = sorted((lo, hi) for _, _, _, _, lo, hi, _ in t.units.tolist())
    assert pieces[0][0] == 0 and pieces[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert all(lo % 32 == 0 for lo, hi in pieces if hi > lo)  # empty trailing pieces do nothing
    assert sorted(u[6] for u in t.units.tolist()) == list(range(splits))
