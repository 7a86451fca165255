"""Support kernels under the Triton interpreter against their torch references: RMSNorm (+fused
residual), Neox RoPE, SiLU-and-mul, KV-cache store, sampling. Fresh random inputs each run,
outputs poisoned with NaN (or -1) before each run, odd sizes, fp32 and fp16, and the persistent
(Ascend-style, grid = cores) variant of every task loop."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit function is created

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from portable_xy.backends import reference as ref  # noqa: E402
from portable_xy.backends.profile import load_profile  # noqa: E402
from portable_xy.tools import aot_specs  # noqa: E402
from portable_xy.triton_kernels import activation, kv_cache, rms_norm, rope, sampling  # noqa: E402

if type(rms_norm.rms_norm_kernel).__name__ != "InterpretedFunction":
    pytest.skip("triton_kernels were imported without TRITON_INTERPRET=1 in this process", allow_module_level=True)

MS = (1, 3, 17, 127, 300)
DTYPES = (torch.float32, torch.float16)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


def _profile(persistent: bool, **support):
    """Interpreter profile; ``persistent`` = Ascend-style grid of 3 'cores' looping over tasks."""
    p = load_profile("interpret")
    sup = {**p.data["support"], "persistent": persistent, "programs_per_core": 1, **support}
    return dataclasses.replace(p, data={**p.data, "support": sup, "num_cores": 3})


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _close(got, want):
    atol, rtol = TOL[want.dtype]
    assert got.dtype == want.dtype and not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


# ---- RMSNorm ----------------------------------------------------------------------------------
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype, persistent):
    prof = _profile(persistent, block_d=64)  # D = 72: two chunks, the second one masked
    g = _gen()
    D = 72
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    for M in MS:
        x = torch.randn(M, D, generator=g).to(dtype)
        res = torch.randn(M, D, generator=g).to(dtype)
        x0, r0 = x.clone(), res.clone()
        y, r = rms_norm.rms_norm(x, w, 1e-6, res, prof, out=_nan((M, D), dtype), residual_out=_nan((M, D), dtype))
        y_ref, r_ref = ref.rms_norm_ref(x, w, 1e-6, res)
        _close(y, y_ref)
        assert torch.equal(r, r_ref)  # the residual sum is one rounding in x.dtype, like torch
        assert torch.equal(x, x0) and torch.equal(res, r0)  # inputs untouched
        if M < 300:  # (the interpreter is slow; the residual-free path is the simpler one)
            y, none = rms_norm.rms_norm(x, w, 1e-5, None, prof, out=_nan((M, D), dtype))
            assert none is None
            _close(y, ref.rms_norm_ref(x, w, 1e-5)[0])


def test_rms_norm_fp32_residual_stream_with_fp16_activations():
    """The engine keeps the residual stream in fp32: the sum stays fp32, the output is fp16."""
    g = _gen()
    D = 72
    w = (1 + 0.1 * torch.randn(D, generator=g)).half()
    for M in (1, 17):
        x = torch.randn(M, D, generator=g).half()
        res = torch.randn(M, D, generator=g)
        y, r = rms_norm.rms_norm(x, w, 1e-6, res, _profile(False, block_d=64))
        y_ref, r_ref = ref.rms_norm_ref(x, w, 1e-6, res)
        assert r.dtype == torch.float32 and torch.equal(r, r_ref)
        _close(y, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_on_strided_view(dtype):
    """Qwen3-style q/k norm: [T, H, D] views into the fused QKV output (non-contiguous)."""
    g = _gen()
    T, HQ, HK, D = 17, 4, 2, 32
    qkv = torch.randn(T, (HQ + 2 * HK) * D, generator=g).to(dtype)
    q = qkv[:, : HQ * D].reshape(T, HQ, D)
    k = qkv[:, HQ * D : (HQ + HK) * D].reshape(T, HK, D)
    assert not q.is_contiguous()
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype)
    for t in (q, k):
        y, _ = rms_norm.rms_norm(t, w, 1e-6, None, _profile(False), out=_nan(t.shape, dtype))
        _close(y, ref.rms_norm_ref(t, w, 1e-6)[0])


# ---- RoPE -------------------------------------------------------------------------------------
def _cos_sin(max_pos, D):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    f = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat((f.cos(), f.sin()), dim=-1)


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 24])  # 24: half = 12 is not a power of two (masked tile)
def test_rope(D, dtype, persistent):
    prof = _profile(persistent, block_h=2)  # 4 q heads / 3 kv heads in chunks of 2 (masked chunk)
    g = _gen()
    HQ, HK = 4, 3
    cs = _cos_sin(512, D)
    for T in (1, 3, 17, 127):
        qkv = torch.randn(T, (HQ + 2 * HK) * D, generator=g).to(dtype)
        q = qkv[:, : HQ * D].reshape(T, HQ, D)  # strided views, as the model passes them
        k = qkv[:, HQ * D : (HQ + HK) * D].reshape(T, HK, D)
        pos = torch.randint(0, 512, (T,), generator=g)
        qo, ko = rope.rope(q, k, pos, cs, prof, q_out=_nan((T, HQ, D), dtype), k_out=_nan((T, HK, D), dtype))
        q_ref, k_ref = ref.rope_ref(q, k, pos, cs)
        _close(qo, q_ref)
        _close(ko, k_ref)


# ---- SiLU-and-mul -------------------------------------------------------------------------------
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype, persistent):
    prof = _profile(persistent, block_i=16)  # I = 40: three column blocks, the last one masked
    g = _gen()
    for M in MS:
        x = (3 * torch.randn(M, 80, generator=g)).to(dtype)
        y = activation.silu_and_mul(x, prof, out=_nan((M, 40), dtype))
        _close(y, ref.silu_and_mul_ref(x))


# ---- KV store -----------------------------------------------------------------------------------
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv(dtype, persistent):
    prof = _profile(persistent)
    g = _gen()
    NB, BS, H, D = 24, 16, 3, 24  # 3 heads and D = 24: masked [4, 32] tiles
    for T in MS:
        kv = torch.randn(T, 3 * H * D, generator=g).to(dtype)
        k = kv[:, : H * D].reshape(T, H, D)  # strided views
        v = kv[:, H * D : 2 * H * D].reshape(T, H, D)
        slots = torch.randperm(NB * BS, generator=g)[:T]
        slots[torch.rand(T, generator=g) < 0.3] = -1  # -1: skip
        caches = [_nan((NB, BS, H, D), dtype) for _ in range(4)]
        kv_cache.store_kv(k, v, caches[0], caches[1], slots, prof)
        ref.store_kv_ref(k, v, caches[2], caches[3], slots)
        torch.testing.assert_close(caches[0], caches[2], atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0, equal_nan=True)
        assert torch.isnan(caches[0]).any() or T == NB * BS  # untouched slots stay untouched


# ---- sampling -----------------------------------------------------------------------------------
def _sample_both(logits, temp, top_k, top_p, min_p, u, prof):
    out = torch.full((logits.shape[0],), -1, dtype=torch.long)
    got = sampling.sample(logits, temp, top_k, top_p, min_p, u, prof, out=out)
    want = ref.sample_ref(logits, temp, top_k, top_p, min_p, u)
    return got, want


@pytest.mark.parametrize("persistent", [False, True])
def test_sampling_matches_reference(persistent):
    prof = _profile(persistent)
    prof = dataclasses.replace(prof, data={**prof.data, "sampling": {"block_v": 256}})  # V = 1003: 4 chunks
    g = _gen()
    V = 1003
    # rows: greedy, plain, top-k, top-p, min-p, all three, top-k = 1, top-k >= V, tiny top-p
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3, 0.9, 0.6, 1.0, 1.0, 2.0])
    top_k = torch.tensor([0, 0, 20, 0, 0, 40, 1, 5000, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.85, 1.0, 0.9, 1.0, 1.0, 0.01])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.02, 0.0, 0.0, 0.0])
    n = len(temp)
    for _ in range(2):
        logits = 3 * torch.randn(n, V, generator=g)
        logits[:, torch.randint(0, V, (50,), generator=g)] = float("-inf")  # banned tokens
        u = torch.rand(n, generator=g)
        got, want = _sample_both(logits, temp, top_k, top_p, min_p, u, prof)
        assert got.tolist() == want.tolist()


def test_sampling_inverse_cdf_boundaries_and_ties():
    """Deterministic uniforms at the edges, and exactly tied probabilities (integer logits): the
    draw walks a tie group in id order, like the reference's stable sort."""
    prof = _profile(False)
    V = 64
    logits = torch.zeros(1, V)
    logits[0, [5, 9, 33, 40]] = 2.0  # four tied favourites, the rest tied below
    logits[0, 50] = -float("inf")
    one = torch.ones(1)
    for uval in (0.0, 0.1, 0.3, 0.5, 0.62, 0.8, 0.97, 0.999999):
        u = torch.tensor([uval])
        got, want = _sample_both(logits, one, torch.zeros(1, dtype=torch.long), one, torch.zeros(1), u, prof)
        assert got.tolist() == want.tolist(), uval
    # greedy on ties: the lowest id
    got, want = _sample_both(logits, torch.zeros(1), torch.zeros(1, dtype=torch.long), one, torch.zeros(1), one, prof)
    assert got.tolist() == want.tolist() == [5]


def test_sampling_tie_groups_with_padding_lanes():
    """Integer logits (many exact ties), banned tokens, V = 61 (padding lanes in the chunk) and
    uniforms at 0 and just below 1: still the reference's tokens."""
    g = _gen()
    n, V = 16, 61
    logits = torch.randint(-3, 3, (n, V), generator=g).float()
    logits[:, torch.randint(0, V, (5,), generator=g)] = float("-inf")
    u = torch.rand(n, generator=g)
    u[0], u[1] = 0.99999994, 0.0
    ones, zeros = torch.ones(n), torch.zeros(n)
    got, want = _sample_both(logits, ones, zeros.long(), ones, zeros, u, _profile(False))
    assert got.tolist() == want.tolist()


def test_sampling_greedy_many_rows():
    g = _gen()
    logits = torch.randn(13, 300, generator=g)
    z = torch.zeros(13)
    got, want = _sample_both(logits, z, z.long(), torch.ones(13), z, torch.rand(13, generator=g), _profile(True))
    assert got.tolist() == want.tolist()


# ---- ahead-of-time specs -------------------------------------------------------------------------
def test_aot_specs_cover_every_argument():
    prof = load_profile("cuda", "sm90")
    for kernel in ("rms_norm", "rope", "activation", "kv_cache", "sampling"):
        specs = aot_specs.KERNEL_SPECS[kernel](prof)
        assert specs
        for spec in specs:
            assert set(spec["signature"]) | set(spec["constexprs"]) == set(spec["fn"].arg_names)
            assert spec["expect_tensor_cores"] is False
