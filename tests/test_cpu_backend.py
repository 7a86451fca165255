"""The cpu backend's fast paths against the plain torch references they replace."""

import pytest
import torch
import torch.nn.functional as F

from portable_xy.backends import AttnMetadata, get_backend
from portable_xy.backends.cpu import attention_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_linear_is_bit_identical_to_f_linear(dtype):
    be = get_backend("cpu")
    w = torch.randn(300, 96, dtype=dtype)
    b = torch.randn(300, dtype=dtype)
    pw = be.prepare_weight(w)
    x = torch.randn(300, 96, dtype=dtype)
    for m in (1, 3, 17, 127, 300):
        y = be.linear(x[:m], pw, b)
        assert torch.equal(y, F.linear(x[:m], w, b))
        if dtype == torch.bfloat16:  # oneDNN bf16: rows never depend on M (MKL fp32 switches to gemv at M=1)
            assert torch.equal(y[:1], be.linear(x[:1], pw, b))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_batched_decode_attention_matches_reference(dtype, tol):
    be = get_backend("cpu")
    g = torch.Generator().manual_seed(0)
    bs, hkv, hq, d, nblocks = 16, 2, 6, 64, 40
    k_cache = torch.randn(nblocks, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(nblocks, bs, hkv, d, generator=g).to(dtype)
    seq_lens = [1, 17, 33, 130]
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, used = [], 0
    for n in seq_lens:
        k = -(-n // bs)
        tables.append(perm[used : used + k] + [0] * (9 - k))
        used += k
    meta = AttnMetadata(
        query_start_loc=torch.arange(5, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.zeros(4, dtype=torch.long),
        positions=torch.tensor([n - 1 for n in seq_lens]),
        query_lens_cpu=[1] * 4,
        seq_lens_cpu=seq_lens,
    )
    q = torch.randn(4, hq, d, generator=g).to(dtype)
    out = be.attention(q, k_cache, v_cache, meta, 0.125)
    ref = attention_ref(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_mixed_stage_attention_matches_reference(dtype, tol):
    """Decodes, verifies and short chunks (one padded SDPA call) mixed with long chunks, a
    prefill without history and a tree-verify stage (one call each), against the reference."""
    be = get_backend("cpu")
    g = torch.Generator().manual_seed(1)
    bs, hkv, hq, d, nblocks = 16, 2, 6, 64, 64
    k_cache = torch.randn(nblocks, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(nblocks, bs, hkv, d, generator=g).to(dtype)
    q_lens = [1, 5, 17, 3, 40, 16, 4, 1]
    hist = [30, 7, 50, 0, 0, 100, 12, 3]
    tree_stage = 6  # a 4-row tree: each row sees the root and itself
    kv_lens = [q + h for q, h in zip(q_lens, hist)]
    perm = torch.randperm(nblocks, generator=g).tolist()
    width = max(-(-n // bs) for n in kv_lens)
    tables, used = [], 0
    for n in kv_lens:
        k = -(-n // bs)
        tables.append(perm[used : used + k] + [0] * (width - k))
        used += k
    tree = torch.eye(4, dtype=torch.int8)
    tree[:, 0] = 1
    offsets = torch.full((len(q_lens),), -1, dtype=torch.int32)
    offsets[tree_stage] = 0
    meta = AttnMetadata(
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.long),
        positions=torch.zeros(sum(q_lens), dtype=torch.long),
        query_lens_cpu=q_lens,
        seq_lens_cpu=kv_lens,
        tree_mask_offsets=offsets,
        tree_masks=tree.flatten(),
    )
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    out = be.attention(q, k_cache, v_cache, meta, 0.125)
    assert set(meta.plan.stages) == {0, 1, 3, 5, 7}  # short causal stages batched
    ref = attention_ref(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_rms_norm_fast_path_matches_reference(x_dtype, res_dtype, rows):
    from portable_xy.backends.cpu import rms_norm_ref

    be = get_backend("cpu")
    x = torch.randn(rows, 576).to(x_dtype)
    w = (1 + 0.1 * torch.randn(576)).to(x_dtype)
    res = torch.randn(rows, 576).to(res_dtype)
    out, r = be.rms_norm(x, w, 1e-5, res)
    ref_out, ref_r = rms_norm_ref(x, w, 1e-5, res)
    assert r.dtype == res_dtype and out.dtype == x_dtype
    torch.testing.assert_close(r, ref_r, atol=0, rtol=0)
    tol = 1e-5 if x_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    out, none = be.rms_norm(x, w, 1e-5)
    assert none is None
    torch.testing.assert_close(out.float(), rms_norm_ref(x, w, 1e-5)[0].float(), atol=tol, rtol=tol)
