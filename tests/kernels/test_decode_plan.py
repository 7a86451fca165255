"""Fixed (graph-replayable) Meta-Attention decode plans under the Triton interpreter: one plan per
bucket size whatever the step's lengths, KV pieces cut from the run-time ``seq_lens`` (split-KV
on and off), padded rows that cannot change real rows; against ``cpu.attention_ref`` with fresh
random inputs and NaN-poisoned outputs and unused cache blocks."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit function is created

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from portable_xy.backends import AttnMetadata  # noqa: E402
from portable_xy.backends.profile import Profile  # noqa: E402
from portable_xy.backends.reference import attention_ref  # noqa: E402
from portable_xy.triton_kernels import meta_attention as ma  # noqa: E402
from portable_xy.triton_kernels.task_table import RUNTIME_KV, UNIT_FIELDS  # noqa: E402

if type(ma.meta_attention_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton_kernels were imported without TRITON_INTERPRET=1 in this process", allow_module_level=True)

BLOCK = 16


def profile(num_cores: int, num_splits: int) -> Profile:
    att = {"q_tiles": [16, 32, 64], "kv_tile": 32, "split_kv": {"max_seqs": 64, "num_splits": num_splits}}
    return Profile("interpret", None, {"num_cores": num_cores, "kv_block_size": BLOCK, "attention": att})


@pytest.mark.parametrize("num_cores,num_splits", [(4, 1), (64, 4)])
def test_fixed_plan_matches_reference(num_cores, num_splits, gen, poison):
    """5 real decodes of random lengths padded to a bucket of 8 (padded rows: seq_len 1 over block
    0, which holds NaN): real rows equal the reference on the 5 stages alone."""
    bucket, n, hq, hkv, d, width = 8, 5, 6, 2, 32, 8
    plan = ma.plan_decode_attention(bucket, width * BLOCK, hq, hkv, profile(num_cores, num_splits), "cpu")
    assert plan.table.num_splits == num_splits
    seq_lens = torch.randint(1, width * BLOCK + 1, (n,), generator=gen).tolist()
    seq_lens[0] = width * BLOCK  # the longest sequence the plan supports
    nblk = [-(-s // BLOCK) for s in seq_lens]
    perm = (1 + torch.randperm(sum(nblk), generator=gen)).tolist()  # block 0 stays unused
    tables = torch.zeros(bucket, width, dtype=torch.int32)
    used = 0
    for s, k in enumerate(nblk):
        tables[s, :k] = torch.tensor(perm[used : used + k])
        used += k
    k_cache = torch.randn(sum(nblk) + 1, BLOCK, hkv, d, generator=gen)
    v_cache = torch.randn(sum(nblk) + 1, BLOCK, hkv, d, generator=gen)
    poison(k_cache[0]), poison(v_cache[0])
    meta = AttnMetadata(
        query_start_loc=torch.arange(bucket + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens + [1] * (bucket - n), dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.full((bucket,), -1, dtype=torch.long),
        positions=torch.zeros(bucket, dtype=torch.long),
        query_lens_cpu=[1] * bucket,
        seq_lens_cpu=[width * BLOCK] * bucket,
        plan=plan,
    )
    q = torch.randn(bucket, hq, d, generator=gen)
    out = ma.meta_attention(q, k_cache, v_cache, meta, d**-0.5, plan, out=poison(torch.empty_like(q)))
    real = AttnMetadata(
        query_start_loc=torch.arange(n + 1, dtype=torch.int32), seq_lens=meta.seq_lens[:n],
        block_tables=tables[:n], slot_mapping=meta.slot_mapping[:n], positions=meta.positions[:n],
        query_lens_cpu=[1] * n, seq_lens_cpu=seq_lens,
    )  # fmt: skip
    ref = attention_ref(q[:n], k_cache, v_cache, real, d**-0.5)
    torch.testing.assert_close(out[:n], ref, atol=1e-4, rtol=1e-4)


def test_fixed_plan_depends_only_on_the_bucket():
    """Same tensors (shape and contents) for a bucket; every unit's KV piece is cut at run time;
    one unit per (row, KV head, split)."""
    prof = profile(64, 4)
    a = ma.plan_decode_attention(8, 512, 8, 2, prof, "cpu")
    b = ma.plan_decode_attention(8, 512, 8, 2, prof, "cpu")
    assert torch.equal(a.table.units, b.table.units) and torch.equal(a.table.segments, b.table.segments)
    assert a.table.units.shape == (8 * 2 * 4, len(UNIT_FIELDS))
    assert (a.table.units[:, 5] == RUNTIME_KV).all() and (a.table.units[:, 4] == 0).all()
    assert sorted(map(tuple, a.table.units[:, [0, 3, 6]].tolist())) == [
        (s, h, k) for s in range(8) for h in range(2) for k in range(4)
    ]
    assert a.table.segments.shape == (64 * 4 + 1,) and not a.has_tree
