"""bf16 accuracy of the compiled kernels against the torch reference on a real GPU / NPU.
Marked ``cuda`` / ``npu``; skipped cleanly on machines without the hardware (like this CI)."""

import pytest
import torch

from portable_xy.backends import reference as ref


def _device_backend(name: str):
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "npu":
        try:
            import torch_npu  # noqa: F401
        except ImportError:
            pytest.skip("torch_npu not installed")
        if not torch.npu.is_available():
            pytest.skip("no NPU device")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton in interpreter mode; run with TRITON_INTERPRET=0")
    from portable_xy.backends import get_backend

    return get_backend(name)


DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("npu", marks=pytest.mark.npu)]


@pytest.mark.parametrize("name", DEVICES)
def test_bf16_ops_match_reference(name):
    be = _device_backend(name)
    dev, bf = be.device, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    for m in (1, 3, 17, 127, 300):
        x = torch.randn(m, 576, generator=g)
        w = torch.randn(1536, 576, generator=g) / 24
        y = be.linear(x.to(dev, bf), be.prepare_weight(w.to(dev, bf))).float().cpu()
        torch.testing.assert_close(y, ref.linear_ref(x.to(bf), w.to(bf)).float(), atol=3e-2, rtol=3e-2)
        nw = 1 + 0.1 * torch.randn(576, generator=g)
        out, _ = be.rms_norm(x.to(dev, bf), nw.to(dev, bf), 1e-5)
        torch.testing.assert_close(out.float().cpu(), ref.rms_norm_ref(x.to(bf), nw.to(bf), 1e-5)[0].float(),
                                   atol=3e-2, rtol=3e-2)  # fmt: skip
