"""``bench kernels`` on a real GPU / NPU (marked ``cuda`` / ``npu``; skipped without the device or
when this process runs Triton in interpreter mode): a tiny run gives a valid, device-timed report,
and the vendor attention path computes what Meta-Attention computes."""

from __future__ import annotations

import os

import pytest
import torch

from portable_xy.tools.bench import kernels as bk
from portable_xy.tools.bench.impls import attention_impls
from portable_xy.tools.bench.shapes import mixed_step

DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("npu", marks=pytest.mark.npu)]


def _require(name: str) -> None:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "npu":
        pytest.importorskip("torch_npu")
        if not torch.npu.is_available():
            pytest.skip("no NPU device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton in interpreter mode; run with TRITON_INTERPRET=0")


@pytest.mark.parametrize("name", DEVICES)
def test_tiny_device_report(name):
    _require(name)
    report = bk.run_kernel_bench(
        name, ["qwen2-7b"], tiny=True, reps=3, warmup=1, case_filter="qkv/M=33|mixed_coding|decode_b2_c16",
        log=lambda *_: None,
    )  # fmt: skip
    assert bk.validate_report(report) == []
    assert report["timing"]["method"] == f"{name}_event"
    assert report["peaks"]["tflops"] > 0 and report["env"]["profile"].split("/")[0] in ("cuda", "ascend")
    impls = {(r["kernel"], r["impl"]) for r in report["results"]}
    assert ("gemm", "single_tile") in impls and ("attention", "per_stage") in impls
    assert all(0 < r["utilisation"] < 1.5 for r in report["results"])


@pytest.mark.parametrize("name", DEVICES)
def test_vendor_attention_matches_meta_attention(name):
    _require(name)
    from portable_xy.backends import get_backend

    backend = get_backend(name)
    case = mixed_step("conversation", 256, 16, scale=8)
    gen = torch.Generator().manual_seed(0)
    bs = backend.profile.kv_block_size
    q, kc, vc, meta = bk.attention_inputs(case, 8, 2, 128, bs, torch.float16, backend.device, gen)
    impls = attention_impls(backend, q, kc, vc, meta, 128**-0.5)
    ref = impls["meta_attention"][0]().float().cpu()
    fn, detail = impls["vendor"]
    got = fn()
    if "SDPA" in detail:  # per sequence [1, H, q, D]
        got = torch.cat([o[0].transpose(0, 1) for o in got])
    elif "torch_npu" in detail:  # per sequence BSND [1, q, H, D]
        got = torch.cat([o[0] for o in got])
    torch.testing.assert_close(got.float().cpu(), ref, atol=2e-2, rtol=2e-2)
