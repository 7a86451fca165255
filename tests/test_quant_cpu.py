"""Quantized weights on the cpu backend: GGUF blocks repacked (backends/quant.py,
models/weights.py) and the C GEMMs over them (backends/cpu_native.c), against the dequantized
torch reference.

Every kernel build is checked: ``-march=native`` (what the backend loads), ``-march=x86-64-v3``
(AVX2) and ``-march=x86-64`` (plain C). Outputs are NaN-poisoned, sizes odd (block tails of every
length the kernels split on), inputs fresh random."""

import platform

import numpy as np
import pytest
import torch

from portable_xy.backends import cpu_native
from portable_xy.backends.quant import QTYPES, QuantWeight, dequantize_ref, quantize_ref

BF16 = torch.bfloat16
ARCHES = ["native"] + (["x86-64-v3", "x86-64"] if platform.machine() == "x86_64" else [])
# (M, N, K): K of 1, 3, 17, 18, 19, 33 and 48 blocks (the int8 AVX-512 kernel splits rows into groups
# of 4 blocks, a pair and a single block, and its scales into chunks of 16 blocks)
SIZES = [(1, 1, 32), (3, 33, 96), (5, 129, 544), (2, 7, 576), (4, 9, 608), (17, 70, 1056), (1, 64, 1536)]


def _host_flags() -> set[str]:
    return set(cpu_native._cpu_flags().split())


@pytest.fixture(scope="module", params=ARCHES)
def lib(request, tmp_path_factory):
    return request.param, cpu_native.open_library(cpu_native.build(request.param, tmp_path_factory.mktemp("q")))


def test_the_build_reports_the_kernel_its_instruction_set_selects(lib):
    arch, handle = lib
    want = {"x86-64-v3": "avx2", "x86-64": "plain-c"}.get(arch)
    if want is None:  # native: what this host's CPU has
        flags = _host_flags()
        want = "avx512-vnni" if {"avx512_vnni", "avx512bw"} <= flags else "avx2" if "avx2" in flags else "plain-c"
    assert cpu_native.quant_kernel(handle) == want


def quantize_act_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per 32 values of each row: int8 a = round(x / e), e = max|x| / 127, s = e * sum(a)."""
    m, k = x.shape
    xb = x.float().view(m, k // 32, 32)
    e = xb.abs().amax(-1) / 127
    inv = torch.where(e > 0, 1 / e, torch.zeros_like(e))
    a = torch.round(xb * inv[..., None]).clamp(-127, 127)
    return a, e, e * a.sum(-1)


def int8_scheme_ref(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """fp64 sum_b (d e)_b (q_b . a_b) + m_b s_b: the int8-activation GEMM without rounding."""
    a, e, s = quantize_act_ref(x)
    from portable_xy.backends.quant import unpack_quants

    q = unpack_quants(w).double().view(w.n, w.k // 32, 32)
    dots = torch.einsum("mbj,nbj->mnb", a.double(), q)
    d, mins = w.d.double(), w.m.double()
    return (dots * d[None] * e.double()[:, None]).sum(-1) + (mins[None] * s.double()[:, None]).sum(-1)


def _case(qtype, m, n, k, seed, bias):
    g = torch.Generator().manual_seed(seed)
    w = quantize_ref(torch.randn(n, k, generator=g), qtype)
    x = (torch.randn(m, k, generator=g) * 2).to(BF16)
    b = torch.randn(n, generator=g).to(BF16) if bias else None
    return w, x, b


def _within_bf16(y: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> None:
    """y is ref rounded once to bf16, up to fp32 summation error (relative to sum |x||w|)."""
    err = (y.float() - ref.float()).abs()
    bound = ref.abs().float() * 2**-8 + scale * 1e-5
    assert torch.isfinite(y).all()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("qtype", sorted(QTYPES))
@pytest.mark.parametrize("m,n,k", SIZES)
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_activation_gemm_matches_the_dequantized_reference(lib, qtype, m, n, k, bias):
    _, handle = lib
    w, x, b = _case(qtype, m, n, k, seed=m * 1000 + n + k, bias=bias)
    deq = dequantize_ref(w)
    ref = x.double() @ deq.double().T + (0 if b is None else b.double())
    out = torch.full((m, n), float("nan"), dtype=BF16)
    y = cpu_native.qgemm(handle, x, cpu_native.pack_quant(handle, w, False), b, int8=False, out=out)
    assert y.data_ptr() == out.data_ptr()
    _within_bf16(y, ref, x.float().abs() @ deq.abs().T)


@pytest.mark.parametrize("qtype", sorted(QTYPES))
@pytest.mark.parametrize("m,n,k", SIZES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_activation_gemm_matches_its_scheme_and_the_dequantized_reference(lib, qtype, m, n, k, bias):
    _, handle = lib
    w, x, b = _case(qtype, m, n, k, seed=m * 7 + n * 3 + k, bias=bias)
    ref = int8_scheme_ref(x, w) + (0 if b is None else b.double())
    out = torch.full((m, n), float("nan"), dtype=BF16)
    y = cpu_native.qgemm(handle, x, cpu_native.pack_quant(handle, w, True), b, int8=True, out=out)
    deq = dequantize_ref(w)
    scale = x.float().abs() @ deq.abs().T
    _within_bf16(y, ref, scale)
    # and close to the float product: the activation rounding costs ~0.5% of sum |x||w|
    exact = x.float() @ deq.T + (0 if b is None else b.float())
    assert ((y.float() - exact).abs() <= 0.02 * scale + 0.01).all()


@pytest.mark.parametrize("int8", [False, True])
def test_a_rows_result_does_not_depend_on_the_batch(lib, int8):
    _, handle = lib
    w, x, _ = _case("q4_1", 17, 65, 544, seed=3, bias=False)
    w = cpu_native.pack_quant(handle, w, int8)
    whole = cpu_native.qgemm(handle, x, w, None, int8)
    for i in (0, 5, 16):
        assert torch.equal(cpu_native.qgemm(handle, x[i : i + 1].contiguous(), w, None, int8)[0], whole[i])


def test_zero_and_constant_blocks_quantize_without_nan(lib):
    _, handle = lib
    w, _, _ = _case("q8_0", 1, 8, 96, seed=1, bias=False)
    x = torch.zeros(2, 96, dtype=BF16)
    x[1, 32:64] = 3.0  # one zero block, one constant block
    y = cpu_native.qgemm(handle, x, cpu_native.pack_quant(handle, w, True), None, True)
    ref = x.float() @ dequantize_ref(w).T
    assert torch.isfinite(y).all() and torch.equal(y[0], torch.zeros_like(y[0]))
    assert torch.allclose(y[1].float(), ref[1], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("qtype", sorted(QTYPES))
def test_gguf_blocks_repack_to_gguf_own_dequantization(qtype):
    """Random GGUF blocks (gguf's own quantizer), repacked: d q + m equals gguf's dequantize."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from portable_xy.models.weights import _repack_gguf

    t = getattr(GGMLQuantizationType, qtype.upper())
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((37, 160)) * rng.uniform(0.01, 10, (37, 1))).astype(np.float32)
    raw = quantize(w, t)
    got = dequantize_ref(_repack_gguf(raw, qtype, 160))
    assert torch.equal(got, torch.from_numpy(dequantize(raw, t).astype(np.float32)))


def test_smollm2_tensors_load_quantized_equal_to_dequantized_reads(smollm2_path):
    """Whole tensors, row ranges and block-aligned column ranges (tensor-parallel shards), with the
    Q/K row un-permutation: the quantized read dequantizes to exactly the float read."""
    from portable_xy.models.loader import open_weights

    src = open_weights(smollm2_path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.2.mlp.down_proj.weight", "model.embed_tokens.weight"):  # fmt: skip
        assert src.quant_type(name) in QTYPES
        assert torch.equal(dequantize_ref(src.get_quant(name)), src.get(name))
        assert torch.equal(dequantize_ref(src.get_quant(name, 0, 64, 128)), src.get(name, 0, 64, 128))
        assert torch.equal(dequantize_ref(src.get_quant(name, 1, 64, 160)), src.get(name, 1, 64, 160))
    assert src.quant_type("model.norm.weight") is None


@pytest.mark.parametrize("qtype", sorted(QTYPES))
@pytest.mark.parametrize("n,k", [(1, 32), (33, 544), (17, 576), (5, 608)])
def test_dequantized_amx_tiles_equal_the_packed_bf16_reference(lib, qtype, n, k):
    """The tiles of the many-row AMX path: bf16(d q + m) in pack_amx's layout, bit for bit, from
    both weight orders (as given, and as packed for the int8 kernel)."""
    _, handle = lib
    w, _, _ = _case(qtype, 1, n, k, seed=n + k, bias=False)
    ref = cpu_native.pack_amx(dequantize_ref(w, BF16)).reshape(-1).view(torch.int16)
    poison = torch.full((ref.numel(),), float("nan"), dtype=BF16)
    assert torch.equal(cpu_native.dequant_amx(handle, w, poison.clone()).view(torch.int16), ref)
    packed = cpu_native.pack_quant(handle, w, True)
    got = cpu_native.dequant_amx(handle, packed, poison.clone(), int8_packed=True)
    assert torch.equal(got.view(torch.int16), ref)
