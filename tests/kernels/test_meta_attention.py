"""Meta-Attention under the Triton interpreter against ``cpu.attention_ref``: one launch over
mixed prefill / prefix-prefill / later-chunk / decode / chain-verify / tree-verify stages, odd
query and KV lengths, GQA ratios 1, 3, 4, head dims 64 and 128, fp32 and fp16, the split-KV
decode path; fresh random inputs each run, output poisoned with NaN first."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit function is created

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from portable_xy.backends import AttnMetadata  # noqa: E402
from portable_xy.backends.cpu import attention_ref  # noqa: E402
from portable_xy.backends.profile import load_profile  # noqa: E402
from portable_xy.triton_kernels import meta_attention as ma  # noqa: E402

if type(ma.meta_attention_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton_kernels were imported without TRITON_INTERPRET=1 in this process", allow_module_level=True)

TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def _profile(num_cores=3, split=None, **att):
    p = load_profile("interpret")
    a = {**p.data["attention"], **att}
    if split:
        a["split_kv"] = {"max_seqs": 64, "num_splits": split}
    return dataclasses.replace(p, data={**p.data, "attention": a, "num_cores": num_cores})


def make_batch(stages, hkv, d, dtype, block_size=16, seed=None):
    """``stages``: list of (q_len, history, tree) with tree None (causal) or a bool [q, q] mask.
    Returns q, caches and the token table, with every stage's blocks scattered at random."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()) if seed is None else seed)
    seq_lens = [q + h for q, h, _ in stages]
    nblk = [-(-n // block_size) for n in seq_lens]
    total = sum(nblk) + 3
    perm = torch.randperm(total, generator=g).tolist()
    tables, used = [], 0
    width = max(nblk)
    for n in nblk:
        tables.append(perm[used : used + n] + [total - 1] * (width - n))
        used += n
    k_cache = torch.randn(total, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(total, block_size, hkv, d, generator=g).to(dtype)
    starts = [0]
    for q, _, _ in stages:
        starts.append(starts[-1] + q)
    trees = [t for _, _, t in stages]
    tree_off, flat, off = None, [], 0
    if any(t is not None for t in trees):
        tree_off = []
        for q, _, t in stages:
            if t is None:
                tree_off.append(-1)
            else:
                tree_off.append(off)
                flat.append(t.to(torch.int8).flatten())
                off += q * q
    meta = AttnMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long),
        positions=torch.zeros(starts[-1], dtype=torch.long),
        query_lens_cpu=[q for q, _, _ in stages],
        seq_lens_cpu=seq_lens,
        tree_mask_offsets=None if tree_off is None else torch.tensor(tree_off, dtype=torch.int32),
        tree_masks=None if tree_off is None else torch.cat(flat),
    )
    return k_cache, v_cache, meta, g


def run_and_check(stages, hq, hkv, d, dtype, profile, block_size=16):
    k_cache, v_cache, meta, g = make_batch(stages, hkv, d, dtype, block_size)
    q = torch.randn(meta.query_start_loc[-1].item(), hq, d, generator=g).to(dtype)
    plan = ma.plan_attention(meta, hq, hkv, profile)
    out = torch.full_like(q, float("nan"))
    ma.meta_attention(q, k_cache, v_cache, meta, d**-0.5, plan, out=out)
    ref = attention_ref(q, k_cache, v_cache, meta, d**-0.5)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    return plan


def tree_mask(q: int, parents: list[int]) -> torch.Tensor:
    """Ancestor-or-self mask of a token tree given each node's parent (-1 = root's parent)."""
    m = torch.zeros(q, q, dtype=torch.bool)
    for i in range(q):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_launch_mixed_batch(dtype):
    tree = tree_mask(7, [-1, 0, 0, 1, 1, 2, 5])
    stages = [
        (37, 0, None),  # prefill, no prefix
        (17, 45, None),  # prefill on a cached prefix (history not a multiple of the block)
        (20, 64, None),  # a later chunk of a long prompt
        (1, 1, None),  # decode on a 1-token history
        (1, 130, None),  # decode
        (4, 29, None),  # chain verify (causal)
        (7, 50, tree),  # tree verify
    ]
    plan = run_and_check(stages, hq=4, hkv=2, d=64, dtype=dtype, profile=_profile())
    assert plan.table.units.shape[0] > 7  # really one launch over many units


@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (8, 2)])  # GQA ratios 1, 3, 4
@pytest.mark.parametrize("d", [64, 128])
def test_gqa_ratios_and_head_dims(hq, hkv, d):
    stages = [(3, 0, None), (1, 16, None), (17, 3, None)]
    run_and_check(stages, hq, hkv, d, torch.float32, _profile(num_cores=2))


@pytest.mark.parametrize("q_len", [1, 3, 17, 127])
def test_odd_query_lengths(q_len):
    run_and_check([(q_len, 31, None)], 4, 2, 64, torch.float16, _profile(num_cores=4))


def test_long_prefill_300():
    run_and_check([(300, 0, None)], 2, 1, 64, torch.float32, _profile(num_cores=4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_kv_decode(dtype):
    stages = [(1, 200, None), (1, 5, None), (1, 77, None)]
    plan = run_and_check(stages, 6, 2, 64, dtype, _profile(num_cores=4, split=4))
    assert plan.table.num_splits == 4


def test_kv_block_size_128():
    run_and_check([(9, 140, None), (1, 300, None)], 4, 4, 64, torch.float32, _profile(), block_size=128)
