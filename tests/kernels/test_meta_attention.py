"""Meta-Attention under the Triton interpreter against ``cpu.attention_ref``: one launch over
mixed prefill / prefix-prefill / later-chunk / decode / chain-verify / tree-verify stages, odd
query and KV lengths, GQA ratios 1, 3, 4, head dims 64 and 128, fp32 and fp16, strided q/out,
the split-KV decode path, random mixed batches (hypothesis); fresh random inputs each run,
outputs poisoned with NaN first."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit function is created

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("triton")

from portable_xy.backends.profile import Profile  # noqa: E402
from portable_xy.backends.reference import attention_ref  # noqa: E402
from portable_xy.tools.selfcheck.kernels import make_batch, tree_mask  # noqa: E402
from portable_xy.triton_kernels import meta_attention as ma  # noqa: E402

if type(ma.meta_attention_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton_kernels were imported without TRITON_INTERPRET=1 in this process", allow_module_level=True)

# fp32 runs exact (ieee) dots, so only summation order differs; fp16 rounds P to fp16 before P @ V
TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


def profile(num_cores=3, q_tiles=(16, 32, 64, 128), kv_tile=32, split=None, **att) -> Profile:
    """An interpreter profile with explicit attention settings (independent of the YAML files)."""
    attention = {"q_tiles": list(q_tiles), "kv_tile": kv_tile, "split_kv": {"max_seqs": 0, "num_splits": 1}, **att}
    if split:
        attention["split_kv"] = {"max_seqs": 64, "num_splits": split}
    return Profile("interpret", None, {"num_cores": num_cores, "kv_block_size": 16, "attention": attention})


def run_and_check(stages, hq, hkv, d, dtype, prof, gen, poison, block_size=16, strided=False, scale=None, **kw):
    """One Meta-Attention launch over ``stages`` (output poisoned first) compared with the
    per-stage torch reference."""
    k_cache, v_cache, meta = make_batch(stages, hkv, d, dtype, gen, block_size, **kw)
    t = int(meta.query_start_loc[-1])
    scale = d**-0.5 if scale is None else scale
    if strided:  # q as the head slice of a fused qkv projection, out with padded rows
        q = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(dtype)[:, : hq * d].view(t, hq, d)
        out = poison(torch.empty(t, hq, d + 16, dtype=dtype))[:, :, :d]
    else:
        q = torch.randn(t, hq, d, generator=gen).to(dtype)
        out = poison(torch.empty(t, hq, d, dtype=dtype))
    plan = ma.plan_attention(meta, hq, hkv, prof, d)
    res = ma.meta_attention(q, k_cache, v_cache, meta, scale, plan, out=out)
    assert res is out
    ref = attention_ref(q, k_cache, v_cache, meta, scale)
    assert not torch.isnan(out).any(), "rows left unwritten"
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    return plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_launch_mixed_batch(dtype, gen, poison):
    """Every stage kind in one launch, each unit in its own stage's tile size."""
    stages = [
        (37, 0, None),  # prefill, no prefix
        (17, 45, None),  # prefill on a cached prefix (history not a multiple of the block)
        (20, 64, None),  # a later chunk of a long prompt
        (1, 1, None),  # decode on a 1-token history
        (1, 130, None),  # decode
        (4, 29, None),  # chain verify (causal)
        (7, 50, tree_mask([-1, 0, 0, 1, 1, 2, 5])),  # tree verify
    ]
    plan = run_and_check(stages, 4, 2, 64, dtype, profile(tree_max_q_tile=128), gen, poison)
    assert plan.table.units.shape[0] > len(stages)
    assert plan.table.tile_rows == [128, 64, 64, 16, 16, 16, 16]  # group 2: rows = 2 x tokens
    assert plan.launch_tiles == (16, 32, 64, 128)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 2)])  # GQA ratios 1, 3, 4
@pytest.mark.parametrize("d", [64, 128])
def test_gqa_ratios_and_head_dims(hq, hkv, d, gen, poison):
    stages = [(3, 0, None), (1, 16, None), (17, 3, None), (5, 40, tree_mask([-1, 0, 1, 0, 3]))]
    run_and_check(stages, hq, hkv, d, torch.float32, profile(num_cores=2), gen, poison, strided=True)


@pytest.mark.parametrize("q_len", [1, 3, 17, 127])
def test_odd_query_lengths(q_len, gen, poison):
    run_and_check([(q_len, 31, None)], 4, 2, 64, torch.float16, profile(num_cores=4), gen, poison, scale=0.3)


def test_long_prefill_300(gen, poison):
    """300 tokens x 2 heads: three 128-row tiles, the causal tail of each skipped."""
    plan = run_and_check([(300, 0, None)], 2, 1, 64, torch.float32, profile(num_cores=4), gen, poison)
    assert plan.table.units.shape[0] == 5  # 64 tokens per 128-row tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_kv_decode(dtype, gen, poison):
    """Decode-only step with idle cores: each (sequence, KV head) is split over the KV range
    (uneven pieces, empty trailing ones for the 5-token sequence), then reduced."""
    stages = [(1, 200, None), (1, 4, None), (1, 77, None)]
    plan = run_and_check(stages, 6, 2, 64, dtype, profile(num_cores=16, split=8), gen, poison)
    assert plan.table.num_splits == 3  # ceil(16 cores / 6 units)


def test_split_kv_only_when_cores_idle(gen):
    k, v, meta = make_batch([(1, 40, None)] * 4, 2, 16, torch.float32, gen)
    assert ma.plan_attention(meta, 4, 2, profile(num_cores=8, split=8)).table.num_splits == 1
    assert ma.plan_attention(meta, 4, 2, profile(num_cores=16, split=8)).table.num_splits == 2
    k, v, meta = make_batch([(1, 40, None), (2, 40, None)], 2, 16, torch.float32, gen)
    assert ma.plan_attention(meta, 4, 2, profile(num_cores=64, split=8)).table.num_splits == 1  # not decode-only


def test_kv_block_size_128(gen, poison):
    run_and_check([(9, 140, None), (1, 300, None)], 4, 4, 64, torch.float32, profile(), gen, poison, block_size=128)


def test_tree_offsets_without_tree_stage(gen, poison):
    """Tree offsets present but every stage causal (empty mask tensor): nothing reads the masks."""
    run_and_check([(5, 20, None), (1, 9, None)], 2, 1, 32, torch.float32, profile(), gen, poison, tree_offsets=True)


def test_tree_tile_limit(gen, poison):
    """``tree_max_q_tile`` (default 64) caps the tile menu of steps with a tree stage."""
    stages = [(40, 10, None), (6, 33, tree_mask([-1, 0, 0, 2, 2, 4]))]
    plan = run_and_check(stages, 4, 1, 64, torch.float16, profile(tree_max_q_tile=32), gen, poison)
    assert plan.launch_tiles == (16, 32, 32, 32)
    k, v, meta = make_batch(stages, 1, 16, torch.float32, gen)
    assert ma.plan_attention(meta, 4, 1, profile()).launch_tiles == (16, 32, 64, 64)


def test_tree_tile_limit_per_head_dim(gen, poison):
    """``tree_max_q_tile: {head_dim: tile}``: the cap of the step's head dim; 64 for one it does
    not name; the smallest cap when the head dim is not known."""
    stages = [(40, 10, None), (6, 33, tree_mask([-1, 0, 0, 2, 2, 4]))]
    prof = profile(tree_max_q_tile={128: 32})
    assert run_and_check(stages, 4, 1, 128, torch.float16, prof, gen, poison).launch_tiles == (16, 32, 32, 32)
    assert run_and_check(stages, 4, 1, 64, torch.float16, prof, gen, poison).launch_tiles == (16, 32, 64, 64)
    _, _, meta = make_batch(stages, 1, 16, torch.float32, gen)
    assert ma.plan_attention(meta, 4, 1, prof).launch_tiles == (16, 32, 32, 32)


def test_rows_seeing_only_late_columns(gen, poison):
    """Tree rows that see nothing in the first KV tiles, with scores far below zero (exp(score)
    underflows): the running max must stay -inf until a row sees something."""
    q_len = 40
    stages = [(q_len, 0, torch.eye(q_len, dtype=torch.bool))]  # every row sees only itself
    k_cache, v_cache, meta = make_batch(stages, 1, 16, torch.float32, gen)
    keys = k_cache[meta.block_tables[0].long()].flatten(0, 1)[:q_len, 0]  # [q_len, 16]
    q = (-10.0 * keys)[:, None, :].contiguous()  # score = -10 |k|^2 ~ -160
    plan = ma.plan_attention(meta, 1, 1, profile(kv_tile=16))
    out = ma.meta_attention(q, k_cache, v_cache, meta, 1.0, plan, out=poison(torch.empty_like(q)))
    values = v_cache[meta.block_tables[0].long()].flatten(0, 1)[:q_len]
    torch.testing.assert_close(out, values, atol=1e-6, rtol=1e-6)


def test_bad_inputs(gen):
    k, v, meta = make_batch([(2, 3, None)], 1, 64, torch.float32, gen)
    plan = ma.plan_attention(meta, 2, 1, profile())
    with pytest.raises(ValueError, match="heads"):
        ma.meta_attention(torch.zeros(2, 4, 64), k, v, meta, 1.0, plan)
    k96, v96, meta96 = make_batch([(2, 3, None)], 1, 96, torch.float32, gen)
    with pytest.raises(ValueError, match="power of two"):
        ma.meta_attention(torch.zeros(2, 2, 96), k96, v96, meta96, 1.0, ma.plan_attention(meta96, 2, 1, profile()))
    with pytest.raises(ValueError, match="q_tiles"):
        ma.plan_attention(meta, 2, 1, profile(q_tiles=(8, 16)))


@st.composite
def batches(draw):
    n = draw(st.integers(1, 5))
    stages = []
    for _ in range(n):
        q_len = draw(st.sampled_from([1, 1, 2, 5, 16, 33]))
        hist = draw(st.integers(0, 70))
        tree = None
        if q_len > 1 and draw(st.booleans()):
            parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, q_len)]
            tree = tree_mask(parents)
        stages.append((q_len, hist, tree))
    return stages


@settings(max_examples=30, deadline=None)
@given(
    stages=batches(),
    heads=st.sampled_from([(1, 1), (3, 1), (4, 2)]),
    d=st.sampled_from([16, 32]),
    block_size=st.sampled_from([16, 32]),
    kv_tile=st.sampled_from([16, 32, 64]),
    q_tiles=st.sampled_from([(16, 32, 64, 128), (16, 64), (32,), (16, 32, 64, 128, 256)]),
    cores=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_mixed_batches(stages, heads, d, block_size, kv_tile, q_tiles, cores, seed, poison):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(seed)
    prof = profile(cores, q_tiles, kv_tile)
    run_and_check(stages, hq, hkv, d, torch.float32, prof, gen, poison, block_size=block_size)
