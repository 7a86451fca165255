"""The cpu backend's fast paths against the plain torch references they replace."""

import pytest
import torch
import torch.nn.functional as F

from portable_xy.backends import AttnMetadata, cpu, get_backend
from portable_xy.backends.reference import attention_ref


@pytest.mark.parametrize("dtype,amx", [(torch.float32, "1"), (torch.bfloat16, "1"), (torch.bfloat16, "0")])
def test_prepared_linear_matches_f_linear(dtype, amx, monkeypatch):
    """fp32 and oneDNN bf16 are bit-identical to F.linear; the C GEMMs (the AMX kernel, or the GEMV
    of single-row steps; tests/test_cpu_native.py) sum in another order, within one bf16 rounding.
    bf16 rows never depend on M (MKL's fp32 switches to a GEMV at M=1, so fp32 rows may)."""
    monkeypatch.setenv("PORTABLE_XY_AMX", amx)
    be = get_backend("cpu")
    if amx == "1" and dtype == torch.bfloat16 and not be._amx:
        pytest.skip("this host has no AMX (or the C path is off)")
    w = torch.randn(300, 96, dtype=dtype)
    b = torch.randn(300, dtype=dtype)
    pw = be.prepare_weight(w)
    x = torch.randn(300, 96, dtype=dtype)
    gemv_rows = cpu.GEMV_ROWS if be._native is not None and dtype == torch.bfloat16 else 0
    for m in (1, 2, 3, 17, 127, 300):
        y = be.linear(x[:m], pw, b)
        if be._amx and dtype == torch.bfloat16 or m <= gemv_rows:
            torch.testing.assert_close(y.float(), F.linear(x[:m], w, b).float(), atol=2e-2, rtol=2e-2)
        else:
            assert torch.equal(y, F.linear(x[:m], w, b))
        if dtype == torch.bfloat16 and m > gemv_rows:
            assert torch.equal(y[:1], be.linear(x[: gemv_rows + 1], pw, b)[:1])


def test_amx_linear_checks_its_input(monkeypatch):
    monkeypatch.setenv("PORTABLE_XY_AMX", "1")
    be = get_backend("cpu")
    if not be._amx:
        pytest.skip("this host has no AMX (or the C path is off)")
    pw = be.prepare_weight(torch.randn(17, 96, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bf16 activations"):
        be.linear(torch.randn(3, 96), pw)
    with pytest.raises(ValueError, match=r"fit a \[17, 96\] weight"):
        be.linear(torch.randn(3, 95, dtype=torch.bfloat16), pw)
    with pytest.raises(ValueError, match="bias"):
        be.linear(torch.randn(3, 96, dtype=torch.bfloat16), pw, torch.randn(17))
    with pytest.raises(ValueError, match="bias"):
        be.linear(torch.randn(3, 96, dtype=torch.bfloat16), pw, torch.randn(16, dtype=torch.bfloat16))
    assert be.linear(torch.randn(0, 96, dtype=torch.bfloat16), pw).shape == (0, 17)
    x = torch.randn(2, 3, 96, dtype=torch.bfloat16)  # leading dims, strided rows
    assert torch.equal(be.linear(x[:, ::2], pw), be.linear(x[:, ::2].reshape(-1, 96), pw).view(2, 2, 17))


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
    from portable_xy.backends.reference import rms_norm_ref

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_rope_matches_reference_in_place_and_not(dtype, rows):
    """q and k sliced from one QKV output are rotated in place; separate tensors are not touched.
    Both give the reference's values bit for bit, and V's columns are left alone."""
    from portable_xy.backends.reference import rope_ref

    be = get_backend("cpu")
    hq, hkv, d = 6, 2, 16
    cos_sin = torch.randn(64, d)
    pos = torch.randint(0, 64, (rows,))
    qkv = torch.randn(rows, (hq + 2 * hkv) * d).to(dtype)
    before = qkv.clone()
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.reshape(rows, hq, d), k.reshape(rows, hkv, d)
    ref_q, ref_k = rope_ref(q.clone(), k.clone(), pos, cos_sin)
    out_q, out_k = be.rope(q, k, pos, cos_sin)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    assert out_q.data_ptr() == qkv.data_ptr()  # rotated in place
    assert torch.equal(v, before[:, (hq + hkv) * d :])
    q2, k2 = before[:, : hq * d].reshape(rows, hq, d).clone(), torch.randn(rows, hkv, d).to(dtype)
    keep_q, keep_k = q2.clone(), k2.clone()
    out_q, out_k = be.rope(q2, k2, pos, cos_sin)
    ref_q, ref_k = rope_ref(keep_q, keep_k, pos, cos_sin)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    assert torch.equal(q2, keep_q) and torch.equal(k2, keep_k)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_kv_copies_follow_the_cache_across_steps(dtype, tol, monkeypatch):
    """Decode steps over a paged cache with the sequences' ids: the backend keeps contiguous K/V
    copies and appends each step's token. Every step matches the reference, through growth past
    the copies' headroom, a sequence leaving, one joining, tokens written in between, a rewind."""
    from portable_xy.backends import cpu

    monkeypatch.setattr(cpu, "KV_COPY_MIN", 0)  # the shapes here are below the size that pays
    be = get_backend("cpu")
    g = torch.Generator().manual_seed(2)
    bs, hkv, hq, d, nblocks = 16, 2, 6, 32, 96
    # slots not yet written hold large garbage: a stale or misplaced read changes the output
    k_cache = (1e3 * torch.randn(nblocks, bs, hkv, d, generator=g)).to(dtype)
    v_cache = (1e3 * torch.randn(nblocks, bs, hkv, d, generator=g)).to(dtype)
    free = torch.randperm(nblocks, generator=g).tolist()
    seqs: dict[int, dict] = {}

    def add(sid: int, length: int) -> None:
        seqs[sid] = {"len": 0, "table": []}
        for _ in range(length):
            append_token(sid)

    def append_token(sid: int) -> int:
        s = seqs[sid]
        if s["len"] % bs == 0:
            s["table"].append(free.pop())
        slot = s["table"][-1] * bs + s["len"] % bs
        k_cache.view(-1, hkv, d)[slot] = torch.randn(hkv, d, generator=g).to(dtype)
        v_cache.view(-1, hkv, d)[slot] = torch.randn(hkv, d, generator=g).to(dtype)
        s["len"] += 1
        return slot

    def step(ids: list[int]) -> None:
        slots = [append_token(i) for i in ids]
        lens = [seqs[i]["len"] for i in ids]
        width = max(len(seqs[i]["table"]) for i in ids)
        meta = AttnMetadata(
            query_start_loc=torch.arange(len(ids) + 1, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_tables=torch.tensor([seqs[i]["table"] + [0] * (width - len(seqs[i]["table"])) for i in ids]),
            slot_mapping=torch.tensor(slots),
            positions=torch.tensor([n - 1 for n in lens]),
            query_lens_cpu=[1] * len(ids),
            seq_lens_cpu=lens,
            seq_ids=list(ids),
        )
        q = torch.randn(len(ids), hq, d, generator=g).to(dtype)
        out = be.attention(q, k_cache, v_cache, meta, 0.125)
        ref = attention_ref(q, k_cache, v_cache, meta, 0.125)
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)

    for sid, n in enumerate([1, 20, 47]):
        add(sid, n)
    step([0, 1, 2])
    copy = be._kv_copies[k_cache.data_ptr()]
    for _ in range(cpu.KV_COPY_SLACK + 20):  # past the headroom: re-gathered once
        step([0, 1, 2])
    assert be._kv_copies[k_cache.data_ptr()] is not copy
    copy = be._kv_copies[k_cache.data_ptr()]
    step([0, 1, 2])
    assert be._kv_copies[k_cache.data_ptr()] is copy  # appended in place
    step([0, 2])  # sequence 1 leaves
    add(3, 5)
    step([0, 2, 3])  # sequence 3 joins
    append_token(0), append_token(3)  # tokens written by another kind of step (a verify, a chunk)
    step([0, 2, 3])
    seqs[0]["len"] -= 3  # a rewind: sequence 0's last tokens are rewritten
    step([0, 2, 3])
    step([0, 2, 3])


@pytest.mark.parametrize("vocab", [1, 3, 300, 4096, 49152])
def test_greedy_sample_is_argmax_with_ties_and_nan(vocab):
    """The backend's greedy sampling (a chunked argmax) returns torch's argmax: the first of tied
    maxima, wherever they fall (same chunk, different chunks), and the first NaN."""
    be = get_backend("cpu")
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g)
    big = x.max() + 1
    picks = torch.randint(0, vocab, (9, 2), generator=g)
    x[0, picks[0]] = big  # a tie anywhere
    x[1, -1] = x[1, 0] = big  # first and last column
    x[2, :] = 0.0  # every column tied
    x[3, picks[3, 0]] = float("nan")
    x[4, picks[4]] = float("nan")
    x[5, picks[5, 0]] = float("-inf")
    if vocab > 200:
        x[6, 127], x[6, 128] = big, big  # either side of a chunk edge
    greedy = torch.zeros(9)
    out = be.sample(x, greedy, torch.full((9,), -1), torch.ones(9), torch.zeros(9), torch.rand(9, generator=g))
    assert torch.equal(out, x.argmax(-1))
