"""Huawei Ascend NPUs: ``torch_npu`` (imported lazily, only here), HCCL, NPU graphs, triton-ascend.

Architecture names: ``910b`` for ``Ascend910B*``, ``910_93`` for ``Ascend910_93*`` and
``Ascend910C*`` (the A3 parts), otherwise the SoC name lower-cased without its ``Ascend`` prefix;
profiles in ``backends/profiles/ascend/``.
"""

from __future__ import annotations

import importlib.util
import itertools
from types import ModuleType
from typing import Any

import torch

from ..profile import Profile
from .interface import DeviceInfo, Platform, run_quiet


def ascend_arch(soc: str) -> str | None:
    """``Ascend910B3`` -> ``910b``; ``Ascend910_9382`` / ``Ascend910C`` -> ``910_93``; other names
    lower-cased without the ``Ascend`` prefix; ``None`` for an empty name."""
    s = str(soc).strip().lower().replace("ascend", "")
    if s.startswith(("910_93", "910c")):
        return "910_93"
    if s.startswith("910b"):
        return "910b"
    return s or None


def _torch_npu(what: str) -> ModuleType:
    try:
        import torch_npu
    except ImportError as e:
        raise RuntimeError(f"{what} needs torch_npu, which could not be imported ({e})") from e
    return torch_npu


class AscendPlatform(Platform):
    name = "npu"
    vendor = "ascend"
    device_type = "npu"
    dist_backend = "hccl"
    collective_library = "HCCL"
    dist_gather = False  # not every torch_npu has HCCL gather
    core_source = "num_aicore"
    runs_triton = True
    graph_capture = True
    event_timer = "npu_event"
    blas_name = "torch_npu"
    default_arch = "910b"
    tune_gemm_shapes = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]
    tune_ms = [1, 16, 64, 256, 1024, 4096]
    tune_kv_tiles = [32, 64, 128]

    def require(self) -> None:
        try:
            import torch_npu  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "backend 'npu' needs torch_npu (Ascend's PyTorch plugin) and triton-ascend: "
                "pip install 'portable-xy[ascend]' on a machine with CANN; torch_npu could not be imported "
                f"({e})"
            ) from e
        if not torch.npu.is_available():
            raise RuntimeError("backend 'npu': torch_npu is installed but no NPU is available")

    def detect(self) -> DeviceInfo:
        index = torch.npu.current_device()
        name = torch.npu.get_device_name(index)
        cores = None
        try:  # triton-ascend's driver knows the AI-core count; the profile's is the fallback
            import triton

            cores = int(triton.runtime.driver.active.utils.get_device_properties(index)["num_aicore"])
        except Exception:  # noqa: BLE001
            pass
        return DeviceInfo(self.name, torch.device("npu", index), name, self.arch_name(name), cores)

    def arch_name(self, raw: Any) -> str | None:
        return ascend_arch(raw)

    def check_triton(self) -> None:
        if importlib.util.find_spec("triton.backends.ascend") is None:
            raise RuntimeError(
                "backend 'npu': the installed triton is upstream Triton, not triton-ascend (they cannot coexist: "
                "uninstall both, then install triton-ascend)"
            )

    def device_module(self) -> ModuleType:
        _torch_npu("the NPU device module")
        return torch.npu

    def synchronize(self, device: torch.device | None = None) -> None:
        self.device_module().synchronize()

    def graph_api(self) -> tuple[ModuleType, type]:
        _torch_npu("NPU graphs")
        missing = [a for a in ("NPUGraph", "graph", "graph_pool_handle") if not hasattr(torch.npu, a)]
        if missing:
            raise RuntimeError(f"this torch_npu has no NPU graph capture (torch.npu lacks {', '.join(missing)})")
        return torch.npu, torch.npu.NPUGraph

    def candidate_gemm_tiles(self, profile: Profile, arch: str | None) -> list[dict]:
        budget = int((profile.data.get("onchip") or {}).get("live_budget_bytes", 98304))
        return [
            dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, multibuffer=True)
            for bm, bn, bk in itertools.product((16, 32, 64, 128), (64, 128, 256), (64, 128, 256))
            if (bm + bn) * bk * 2 + bm * bn * 4 <= budget
        ]

    def environment(self, device: torch.device) -> dict[str, Any]:
        torch_npu = _torch_npu("the NPU environment report")
        return {
            "device": torch.npu.get_device_name(device.index or 0),
            "driver": getattr(getattr(torch_npu, "version", None), "cann", None) or run_quiet(["npu-smi", "-v"]),
            "torch_npu": getattr(torch_npu, "__version__", None),
        }

    def vendor_gemm(self, x: torch.Tensor, w: torch.Tensor):
        import torch.nn.functional as F

        return (lambda: F.linear(x, w)), "torch_npu F.linear"

    def vendor_attention(self, q, k_cache, v_cache, meta, scale, gathered):
        from ..reference import stage_mask

        torch_npu = _torch_npu("the NPU vendor attention")
        calls = []
        for qs, k, v in gathered:
            ql, kl = qs.shape[0], k.shape[0]
            masked = None if ql == 1 else ~stage_mask(ql, kl, None, q.device)  # True = hidden
            calls.append((qs[None], k[None], v[None], masked))
        hq = q.shape[1]

        def run():
            return [
                torch_npu.npu_fusion_attention(a, b, c, hq, "BSND", atten_mask=m, scale=scale)[0]
                for a, b, c, m in calls
            ]

        return run, "torch_npu npu_fusion_attention per sequence"
