"""The Triton backends as a whole: ``get_backend("interpret")`` builds, its ops match the
reference backend (``backends/reference.py``), attention is delegated to Meta-Attention with the
agreed API, bf16 / missing torch_npu / missing GPU / wrong import order give clear errors, and a
tiny model generates the same tokens as on the ``cpu`` backend (with the reference attention
standing in for Meta-Attention)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

from portable_xy.backends import get_backend
from portable_xy.backends import triton_backend as tb
from portable_xy.backends.base import AttnMetadata
from portable_xy.backends.reference import ReferenceBackend, attention_ref

# not importorskip: importing triton here, before TRITON_INTERPRET=1, would make it unusable for
# the interpreter in this process
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2)}


@pytest.fixture(scope="module")
def be():
    try:
        return get_backend("interpret")
    except RuntimeError as e:  # triton imported without TRITON_INTERPRET earlier in this process
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ref():
    return ReferenceBackend()


def _close(a, b):
    atol, rtol = TOL[b.dtype]
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_interpret_backend_builds(be):
    assert be.name == "interpret" and be.device.type == "cpu"
    assert be.profile.vendor == "interpret" and be.profile.gemm["tiles"]
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert be.supports_dtype(torch.float16) and not be.supports_dtype(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ops_match_reference(be, ref, dtype):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    T, H, HQ, HK, D = 19, 64, 4, 2, 16
    x, w, b = rnd(T, H), rnd(96, H, scale=0.125), rnd(96)
    for bias in (None, b):
        _close(be.linear(x, w, bias), ref.linear(x, w, bias))
    nw, res = rnd(H, scale=0.1) + 1, rnd(T, H)
    y, r = be.rms_norm(x, nw, 1e-6, res)
    y_ref, r_ref = ref.rms_norm(x, nw, 1e-6, res)
    _close(y, y_ref)
    _close(r, r_ref)
    _close(be.rms_norm(x, nw, 1e-6)[0], ref.rms_norm(x, nw, 1e-6)[0])
    qkv = rnd(T, (HQ + 2 * HK) * D)
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)
    q, k, v = q.reshape(T, HQ, D), k.reshape(T, HK, D), v.reshape(T, HK, D)
    pos = torch.randint(0, 100, (T,), generator=g)
    cos_sin = torch.randn(128, D, generator=g)
    for got, want in zip(be.rope(q, k, pos, cos_sin), ref.rope(q, k, pos, cos_sin)):
        _close(got, want)
    gu = rnd(T, 2 * 40, scale=2.0)
    _close(be.silu_and_mul(gu), ref.silu_and_mul(gu))
    caches = [torch.zeros(8, 16, HK, D, dtype=dtype) for _ in range(4)]
    slots = torch.randperm(128, generator=g)[:T]
    slots[::4] = -1
    be.store_kv(k, v, caches[0], caches[1], slots)
    ref.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    n = 5
    logits = 2 * torch.randn(n, 300, generator=g)
    args = (
        logits,
        torch.tensor([0.0, 1.0, 0.8, 1.2, 0.5]),
        torch.tensor([0, 0, 10, 0, 50]),
        torch.tensor([1.0, 1.0, 1.0, 0.9, 0.95]),
        torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1]),
        torch.rand(n, generator=g),
    )
    assert be.sample(*args).tolist() == ref.sample(*args).tolist()


def test_bf16_is_a_clear_error(be):
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        be.linear(x, torch.randn(8, 16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="bfloat16"):
        be.rms_norm(x, torch.ones(16, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(TypeError, match="bfloat16"):  # at model load time already
        be.prepare_weight(torch.zeros(8, 16, dtype=torch.bfloat16))
    w = torch.zeros(8, 16, dtype=torch.float16)
    assert be.prepare_weight(w) is w


def test_attention_goes_to_meta_attention(be, monkeypatch):
    calls = []
    fake = types.ModuleType("portable_xy.triton_kernels.meta_attention")

    def plan_attention(meta, num_heads, num_kv_heads, profile, head_dim=None):
        calls.append(("plan", num_heads, num_kv_heads, profile, head_dim))
        return "PLAN"

    def meta_attention(q, k_cache, v_cache, meta, scale, plan):
        calls.append(("run", plan, scale))
        return torch.zeros_like(q)

    fake.plan_attention, fake.meta_attention = plan_attention, meta_attention
    monkeypatch.setitem(sys.modules, "portable_xy.triton_kernels.meta_attention", fake)
    meta = AttnMetadata(
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        seq_lens=torch.tensor([1], dtype=torch.int32),
        block_tables=torch.zeros(1, 1, dtype=torch.int32),
        slot_mapping=torch.zeros(1, dtype=torch.long),
        positions=torch.zeros(1, dtype=torch.long),
        query_lens_cpu=[1],
        seq_lens_cpu=[1],
    )
    be.prepare(meta, 4, 2, 16)
    assert meta.plan == "PLAN" and calls[0] == ("plan", 4, 2, be.profile, 16)
    q, cache = torch.randn(1, 4, 16), torch.zeros(2, 16, 2, 16)
    assert be.attention(q, cache, cache, meta, 0.25).shape == q.shape
    assert calls[1] == ("run", "PLAN", 0.25)
    meta.plan = None  # prepare() skipped: attention plans itself with q's / the cache's head counts
    be.attention(q, cache, cache, meta, 0.25)
    assert calls[2][:3] == ("plan", 4, 2) and calls[2][4] == 16


def test_npu_without_torch_npu_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` fail
    with pytest.raises(RuntimeError, match="torch_npu"):
        get_backend("npu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="NVIDIA GPU"):
        get_backend("cuda")


def test_cuda_refuses_interpreted_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        get_backend("cuda")


def test_interpret_after_compiled_import_is_a_clear_error():
    code = (
        "import sys\n"
        "if sys.argv[1] == 'kernels':\n    import portable_xy.triton_kernels.rms_norm\n"
        "else:\n    import triton\n"
        "from portable_xy.backends import get_backend\n"
        "try:\n    get_backend('interpret')\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for first in ("kernels", "triton"):
        out = subprocess.run([sys.executable, "-c", code, first], env=env, capture_output=True, text=True, timeout=120)
        assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_interpret_after_the_cli_parser_is_built():
    """``portable-xy generate --backend interpret``: the CLI imports kernel-package modules that do not
    import triton (aot, tuner) before the backend is made; the interpreter must still be chosen."""
    code = (
        "from portable_xy.cli import build_parser\n"
        "build_parser()\n"
        "from portable_xy.backends import get_backend\n"
        "be = get_backend('interpret')\n"
        "import triton.language.standard as std\n"
        "print('MODE', type(std.sum).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "MODE InterpretedFunction" in out.stdout, out.stdout + out.stderr


def test_profile_arch_mapping():
    from portable_xy.backends.device import ascend_arch, cuda_arch, shipped_arch_file

    assert ascend_arch("Ascend910B3") == "910b"
    assert ascend_arch("Ascend910B1") == "910b"
    assert ascend_arch("Ascend910_9382") == "910_93"
    assert shipped_arch_file("ascend", ascend_arch("Ascend310B1")) is None  # -> ascend/default.yaml
    assert cuda_arch(80) == "sm80" and cuda_arch((9, 0)) == "sm90"
    assert shipped_arch_file("cuda", cuda_arch(80)).name == "sm80.yaml"
    assert shipped_arch_file("cuda", cuda_arch(86)) is None  # -> cuda/default.yaml
    with pytest.raises(ValueError):
        tb.make_triton_backend("cpu")


def test_tiny_model_generates_like_cpu(be, tmp_path, monkeypatch):
    """Every op but attention through the Triton kernels inside the engine (chunked prefill mixed
    with decodes); attention is the torch reference until Meta-Attention is wired in."""
    from tiny_models import TINY, _perturb
    from transformers import AutoModelForCausalLM, LlamaConfig

    from portable_xy import LLM, SamplingParams

    cfg = LlamaConfig(**dict(TINY, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _perturb(model, seed=5)
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(tb.TritonBackend, "prepare", lambda self, meta, hq, hkv, d=None: None)
    monkeypatch.setattr(tb.TritonBackend, "attention", lambda self, q, kc, vc, meta, scale: attention_ref(
        q, kc, vc, meta, scale))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, 256, (n,), generator=g).tolist()} for n in (1, 7, 40)]
    params = SamplingParams(temperature=0, max_tokens=4, min_tokens=4)
    outs = {}
    for backend in ("cpu", "interpret"):
        llm = LLM(str(tmp_path), backend=backend, dtype="float32", max_model_len=64, max_num_batched_tokens=16,
                  skip_tokenizer_init=True, num_kv_blocks=32)  # fmt: skip
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["interpret"] == outs["cpu"]
