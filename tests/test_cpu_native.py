"""The cpu backend's C ops (backends/cpu_native.c) against the torch references they replace.

Each op is checked in two builds: ``-march=native`` (what the backend loads; on this x86 host the
attention kernel's AVX-512 branch) and ``-march=x86-64`` (the plain-C twin every other machine
gets). Outputs are poisoned first, sizes are odd, inputs fresh random."""

import platform
import warnings

import pytest
import torch

from portable_xy.backends import AttnMetadata, cpu_native
from portable_xy.backends import cpu as cpu_backend
from portable_xy.backends.reference import (
    attention_ref,
    linear_ref,
    rms_norm_ref,
    rope_ref,
    silu_and_mul_ref,
    store_kv_ref,
)

BF16 = torch.bfloat16
ARCHES = ["native"] + (["x86-64"] if platform.machine() == "x86_64" else [])


@pytest.fixture(scope="module", params=ARCHES)
def lib(request, tmp_path_factory):
    return cpu_native.open_library(cpu_native.build(request.param, tmp_path_factory.mktemp("native")))


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place (same-sign finite values)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("n,k", [(1, 96), (3, 67), (17, 576), (300, 1536), (300, 31)])
def test_gemv_matches_reference_and_is_row_invariant(lib, n, k):
    """bf16 x @ W.T (+ bias) for 1 and 3 rows (K multiples of 32 and odd tails) against the fp32
    product of the same bf16 values, rounded to bf16; each row equals that row computed alone."""
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(3, k, generator=g).to(BF16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(BF16)
    b = torch.randn(n, generator=g).to(BF16)
    for bias in (b, None):
        ref = linear_ref(x.float(), w.float(), None if bias is None else bias.float()).to(BF16)
        out = cpu_native.gemv(lib, x, w, bias)
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
        for i in range(3):
            assert torch.equal(cpu_native.gemv(lib, x[i : i + 1], w, bias), out[i : i + 1])


@pytest.mark.parametrize("m", [1, 3, 17, 33, 300])
@pytest.mark.parametrize("n,k", [(1, 96), (3, 67), (17, 576), (300, 1536), (49, 31)])
def test_amx_gemm_matches_reference_and_is_row_invariant(lib, m, n, k):
    """bf16 x @ W.T (+ bias) on AMX tiles, for row counts below, at and past the 16-row tiles,
    column counts inside one tile, across tiles and with a partial last pair, K multiples of 32
    and not: within one bf16 rounding of the fp32 product of the same values, and each row equal
    to that row computed alone or in a block of 3."""
    if not lib.px_amx_available():
        pytest.skip("no AMX in this build (-march) or on this host")
    g = torch.Generator().manual_seed(m * n * k)
    x = torch.randn(m, k, generator=g).to(BF16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(BF16)
    b = torch.randn(n, generator=g).to(BF16)
    tiles = cpu_native.pack_amx(w)
    for bias in (b, None):
        ref = linear_ref(x.float(), w.float(), None if bias is None else bias.float())
        out = cpu_native.gemm_amx(lib, x, tiles, n, bias, torch.full((m, n), float("nan"), dtype=BF16))
        # fp32 sums in another order, then one rounding to bf16 (relative 2^-8)
        assert ((out.float() - ref).abs() <= ref.abs() * 2**-7 + 1e-5).all()
        for i in sorted({0, m // 2, m - 1}):
            assert torch.equal(cpu_native.gemm_amx(lib, x[i : i + 1], tiles, n, bias), out[i : i + 1])
            assert torch.equal(cpu_native.gemm_amx(lib, x[i : i + 3], tiles, n, bias), out[i : i + 3])


@pytest.mark.parametrize("rows", [1, 3, 17, 300])
@pytest.mark.parametrize("d", [576, 67])
def test_rms_norm_matches_reference(lib, rows, d):
    g = torch.Generator().manual_seed(rows * d)
    x = (3 * torch.randn(rows, d, generator=g)).to(BF16)
    w = (1 + 0.2 * torch.randn(d, generator=g)).to(BF16)
    res = 5 * torch.randn(rows, d, generator=g)
    for residual in (res, None):
        out, r = cpu_native.rms_norm(lib, x, w, 1e-5, residual)
        ref, ref_r = rms_norm_ref(x, w, 1e-5, residual)
        if residual is None:
            assert r is None
        else:
            assert torch.equal(r, ref_r)  # x + residual in fp32: exact
        # the mean of squares is summed in another order: at most one bf16 rounding apart
        assert int(bf16_ulps(out, ref).max()) <= 1
        assert (out == ref).float().mean() > 0.98


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 67), (8, 1536)])
def test_silu_and_mul_matches_reference(lib, rows, n):
    g = torch.Generator().manual_seed(n)
    x = (4 * torch.randn(rows, 2 * n, generator=g)).to(BF16)
    extremes = torch.tensor([-1e4, 1e4, -95.0, 95.0, -30.0, 30.0, 0.0]).to(BF16)
    x[0, : min(n, 7)] = extremes[: min(n, 7)]  # gates where exp(-g) underflows or overflows
    out = cpu_native.silu_and_mul(lib, x)
    ref = silu_and_mul_ref(x)
    torch.testing.assert_close(out.float(), ref.float(), atol=0, rtol=2**-7)
    assert (out == ref).float().mean() > 0.98


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_store_kv_matches_reference(lib, rows):
    """k and v sliced from a QKV output (strided rows) into NaN-poisoned caches, slot -1 skipped:
    the caches equal the reference's bit for bit, NaN everywhere nothing was written."""
    g = torch.Generator().manual_seed(rows)
    hq, hkv, d, bs, nblocks = 6, 2, 16, 5, 7
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, generator=g).to(BF16)
    k = qkv[:, hq * d : (hq + hkv) * d].view(rows, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(rows, hkv, d)
    slots = torch.randperm(nblocks * bs, generator=g)[:rows]
    slots[rows // 2] = -1
    caches = [torch.full((nblocks, bs, hkv, d), float("nan")).to(BF16) for _ in range(4)]  # NaN: compare bits
    cpu_native.store_kv(lib, k, v, caches[0], caches[1], slots)
    store_kv_ref(k, v, caches[2], caches[3], slots)
    for ours, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(ours.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("bad", [-1, 300, 10**9])
def test_out_of_range_positions_and_slots_raise_before_writing(lib, bad):
    """A RoPE position outside the cos/sin table, or a KV slot past the cache, is an IndexError and
    nothing is written (the torch references raise on the same inputs)."""
    g = torch.Generator().manual_seed(7)
    cos_sin = torch.randn(300, 16, generator=g)
    x = torch.randn(3, 2, 16, generator=g).to(BF16)
    before = x.clone()
    pos = torch.tensor([0, 5, bad])
    with pytest.raises(IndexError, match="cos/sin table of 300 rows"):
        cpu_native.rope_(lib, x, pos, cos_sin)
    assert torch.equal(x.view(torch.int16), before.view(torch.int16))
    if bad < 0:
        return  # slot -1 means "skip", not an error
    k = torch.randn(3, 2, 16, generator=g).to(BF16)
    caches = [torch.zeros(4, 5, 2, 16).to(BF16) for _ in range(2)]
    with pytest.raises(IndexError, match="past the cache's 20 slots"):
        cpu_native.store_kv(lib, k, k, caches[0], caches[1], torch.tensor([1, 2, bad]))
    assert not caches[0].any() and not caches[1].any()
    with pytest.raises(IndexError):
        store_kv_ref(k, k, *(c.clone() for c in caches), torch.tensor([1, 2, bad]))


@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("d", [64, 16])
def test_rope_in_place_is_bit_identical_to_reference(lib, rows, d):
    """q and k heads inside a QKV row (strided rows): rotated in place bit for bit as rope_ref;
    the V columns next to them untouched."""
    g = torch.Generator().manual_seed(rows + d)
    hq, hkv = 6, 2
    cos_sin = torch.randn(300, d, generator=g)
    pos = torch.randint(0, 300, (rows,), generator=g)
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, generator=g).to(BF16)
    before = qkv.clone()
    q = qkv[:, : hq * d].reshape(rows, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].reshape(rows, hkv, d)
    ref_q, ref_k = rope_ref(q.clone(), k.clone(), pos, cos_sin)
    cpu_native.rope_(lib, qkv[:, : (hq + hkv) * d].view(rows, hq + hkv, d), pos, cos_sin)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    assert torch.equal(qkv[:, (hq + hkv) * d :], before[:, (hq + hkv) * d :])


@pytest.mark.parametrize("bs,d", [(16, 64), (5, 64), (16, 128), (7, 48)])
def test_paged_attention_matches_reference(lib, bs, d):
    """Decodes, verifies, short chunks with and without history, GQA group 3, in one call (head
    sizes 64 and 128 take the AVX-512 loops where the build has them, 48 the plain-C ones).
    Cache slots no stage may read hold huge values and the output starts as NaN: a stray read
    changes the result, a missed write leaves NaN, and the stage left out keeps its NaN rows."""
    g = torch.Generator().manual_seed(bs * d)
    hkv, hq, nblocks = 2, 6, 200
    q_lens = [1, 1, 4, 16, 3, 1, 7]
    hist = [0, 129, 12, 40, 0, 16, 2]
    kv_lens = [q + h for q, h in zip(q_lens, hist)]
    k_cache = (1e4 * torch.randn(nblocks, bs, hkv, d, generator=g)).to(BF16)
    v_cache = (1e4 * torch.randn(nblocks, bs, hkv, d, generator=g)).to(BF16)
    perm = torch.randperm(nblocks, generator=g).tolist()
    width = max(-(-n // bs) for n in kv_lens) + 2
    tables, used = [], 0
    for n in kv_lens:
        nb = -(-n // bs)
        blocks = perm[used : used + nb]
        used += nb
        for i in range(n):  # only the slots below each stage's length get sane values
            k_cache[blocks[i // bs], i % bs] = torch.randn(hkv, d, generator=g).to(BF16)
            v_cache[blocks[i // bs], i % bs] = torch.randn(hkv, d, generator=g).to(BF16)
        tables.append(blocks + [nblocks - 1] * (width - nb))
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    meta = AttnMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long),
        positions=torch.zeros(starts[-1], dtype=torch.long),
        query_lens_cpu=q_lens,
        seq_lens_cpu=kv_lens,
    )
    qkv = torch.randn(starts[-1], hq + 2 * hkv, d, generator=g).to(BF16)
    q = qkv[:, :hq]  # strided rows, as sliced from the QKV projection
    ref = attention_ref(q, k_cache, v_cache, meta, 0.125)
    skip = 3  # stage 3 is not passed: its rows must keep their NaN
    run = [s for s in range(len(q_lens)) if s != skip]
    stages = torch.tensor([run, [starts[s] for s in run], [q_lens[s] for s in run], [kv_lens[s] for s in run]])
    out = torch.full_like(ref, float("nan"))
    cpu_native.paged_attention(lib, q, out, k_cache, v_cache, meta.block_tables, stages, 0.125)
    kept = torch.zeros(starts[-1], dtype=torch.bool)
    kept[starts[skip] : starts[skip + 1]] = True
    assert out[kept].isnan().all()
    torch.testing.assert_close(out[~kept].float(), ref[~kept].float(), atol=2e-2, rtol=2e-2)


def test_load_without_compiler_warns_and_falls_back(monkeypatch, tmp_path):
    cpu_native.load.cache_clear()
    try:
        monkeypatch.setenv("PORTABLE_XY_CACHE", str(tmp_path))  # nothing cached there
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert cpu_native.load() is None
        cpu_native.load.cache_clear()
        monkeypatch.setenv("PORTABLE_XY_NATIVE", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpu_native.load() is None
    finally:
        cpu_native.load.cache_clear()


def test_build_error_names_the_compiler_message(monkeypatch, tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C;\n")
    monkeypatch.setattr(cpu_native, "SOURCE", bad)
    with pytest.raises(RuntimeError, match="failed on bad.c"):
        cpu_native.build(cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind


# bf16 logits of SmolLM2 (magnitude 16-32) are spaced 0.125-0.25 apart, and the same maths summed in
# another order moves a logit by about one such step. A greedy flip between the C ops and the
# torch ops is accepted only where the torch engine's two candidates are within two steps.
NEAR_TIE_BF16 = 0.3
CHATS = ["What is the capital of France?", "Write a short poem about the sea.", "Explain a hash table.", "Hi!"]


@pytest.mark.parametrize("amx", ["1", "0"])
def test_bf16_engine_with_c_ops_agrees_with_torch_ops(smollm2_path, monkeypatch, amx):
    """SmolLM2 in bf16 under a 64-token budget, so that steps mix long chunks, short chunks and
    decodes, then one chat alone: every C op runs (GEMMs on AMX tiles, or else single-row steps
    on the GEMV), and the greedy tokens equal those of the torch-op engine up to the first near
    tie of a conversation, if any."""
    from collections import Counter

    from portable_xy import LLM, SamplingParams

    convs = [[{"role": "user", "content": c}] for c in CHATS]
    params = SamplingParams(temperature=0, max_tokens=32, min_tokens=32, logprobs=2)
    calls: Counter = Counter()
    monkeypatch.setenv("PORTABLE_XY_AMX", amx)
    lib = cpu_native.load()
    if amx == "1" and not (lib is not None and cpu_native.has_amx(lib)):
        pytest.skip("this host has no AMX (or the C path is off)")
    gemm = "gemm_amx" if amx == "1" else "gemv"
    ops = {gemm, "rms_norm", "rope_", "silu_and_mul", "store_kv", "paged_attention"}
    if gemm == "gemv" and not cpu_backend._HAS_MKLDNN_PACKING:
        # without oneDNN's bf16 (no AVX-512) bf16 weights stay plain: every GEMM is F.linear
        ops.discard("gemv")
    for name in ("gemm_amx", "gemv", "rms_norm", "rope_", "silu_and_mul", "store_kv", "paged_attention"):
        fn = getattr(cpu_native, name)
        monkeypatch.setattr(cpu_native, name, lambda *a, _fn=fn, _name=name: (calls.update([_name]), _fn(*a))[1])
    make = lambda: LLM(  # noqa: E731
        str(smollm2_path), dtype="bfloat16", quantization=None, max_model_len=512, max_num_batched_tokens=64
    )
    run = lambda llm: llm.chat(convs, params, use_tqdm=False) + llm.chat(convs[:1], params, use_tqdm=False)  # noqa: E731
    with_c = run(make())  # the 4 chats batched, then one alone (single-row steps)
    assert set(calls) == ops
    calls.clear()
    monkeypatch.setattr(cpu_native, "load", lambda: None)
    with_torch = run(make())
    assert not calls
    compared, diffs = 0, []
    for a, b in zip(with_c, with_torch):
        ours, theirs = a.outputs[0].token_ids, b.outputs[0].token_ids
        for t, (x, y) in enumerate(zip(ours, theirs)):
            if x != y:
                top = b.outputs[0].logprobs[t]  # the torch engine's view of the two candidates
                assert x in top, f"step {t}: C-op token {x} not in the torch engine's top 2"
                assert top[y].logprob - top[x].logprob < NEAR_TIE_BF16
                break
            compared += 1
            diffs.append(abs(a.outputs[0].logprobs[t][x].logprob - b.outputs[0].logprobs[t][x].logprob))
    assert compared >= 0.5 * len(with_c) * params.max_tokens
    # where the tokens agree, so do the distributions: the chosen token's log-probability differs
    # by ~0.01 typically (a wrong RoPE sign gives ~0.6)
    assert sorted(diffs)[len(diffs) // 2] < 0.05
