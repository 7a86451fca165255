"""AMD GPUs: ROCm builds of torch run through ``torch.cuda`` with ``torch.version.hip`` set;
collectives on RCCL (torch.distributed's ``nccl`` backend), HIP graphs through ``torch.cuda``'s
graph API, Triton's ``hip`` target (hsaco).

Architecture names are the gfx ISA names without target features (``gfx942`` for MI300X,
``gfx90a`` for MI250X, ``gfx1100`` for RDNA3); profiles in ``backends/profiles/rocm/``. Wave size,
LDS, CU count and peaks are profile data (``device:``).
"""

from __future__ import annotations

import itertools
from types import ModuleType
from typing import Any

import torch

from ..profile import Profile, load_profile
from .interface import DeviceInfo, Platform, run_quiet


def gfx_arch(name: str) -> str | None:
    """``gfx942:sramecc+:xnack-`` -> ``gfx942``; ``None`` for an empty name."""
    s = str(name).strip().lower().split(":", 1)[0]
    return s or None


class RocmPlatform(Platform):
    name = "rocm"
    vendor = "rocm"
    device_type = "cuda"  # ROCm torch keeps CUDA's device type and module
    dist_backend = "nccl"  # torch.distributed's nccl backend is RCCL in ROCm builds
    collective_library = "RCCL"
    core_source = "sm_count"  # torch's multi_processor_count, which counts CUs on ROCm
    runs_triton = True
    graph_capture = True
    hf_on_device = True
    event_timer = "hip_event"
    blas_name = "hipBLASLt"
    default_arch = "gfx942"
    tune_gemm_shapes = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]
    tune_ms = [1, 16, 64, 256, 1024, 4096]
    tune_kv_tiles = [32, 64, 128]
    aot_archs = ("gfx942", "gfx90a", "gfx1100")

    def require(self) -> None:
        if torch.version.hip is None or not torch.cuda.is_available():
            raise RuntimeError(
                f"backend {self.name!r} needs an AMD GPU visible to a ROCm build of torch "
                f"(torch.version.hip is {torch.version.hip}, torch.cuda.is_available() is {torch.cuda.is_available()})"
            )

    def detect(self) -> DeviceInfo:
        dev = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(dev)
        arch = self.arch_name(getattr(props, "gcnArchName", ""))
        return DeviceInfo(self.name, dev, props.name, arch, props.multi_processor_count)

    def arch_name(self, raw: Any) -> str | None:
        return gfx_arch(raw)

    def check_triton(self) -> None:
        import triton

        target = triton.runtime.driver.active.get_current_target()
        if target.backend != "hip":
            raise RuntimeError(f"backend {self.name!r}: the active Triton driver targets {target.backend!r}, not HIP")

    def device_module(self) -> ModuleType:
        return torch.cuda

    def graph_api(self) -> tuple[ModuleType, type]:
        return torch.cuda, torch.cuda.CUDAGraph  # HIP graphs under CUDA's names

    def wave_size(self, arch: str) -> int:
        return int(load_profile(self.vendor, arch, tuned=False).data["device"]["wave_size"])

    def triton_target(self, arch: str) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("hip", arch, self.wave_size(arch))

    def candidate_gemm_tiles(self, profile: Profile, arch: str | None) -> list[dict]:
        lds = int(profile.data["device"]["lds_bytes"])
        pool = []
        for bm, bn, bk in itertools.product((16, 32, 64, 128), (64, 128, 256), (32, 64)):
            warps = 4 if bm * bn <= 64 * 128 else 8
            for stages in (2, 1):  # the AMD pipeliner streams through LDS twice at most
                if (bm + bn) * bk * 2 * stages <= lds:
                    pool.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
                    break
        return pool

    def environment(self, device: torch.device) -> dict[str, Any]:
        return {
            "device": torch.cuda.get_device_name(device),
            "driver": run_quiet(["rocm-smi", "--showdriverversion"]),
            "hip": torch.version.hip,
        }

    def device_properties(self, device: torch.device) -> dict[str, Any]:
        p = torch.cuda.get_device_properties(device)
        return {"cu_count": p.multi_processor_count, "gcn_arch": getattr(p, "gcnArchName", None),
                "memory_gib": round(p.total_memory / 2**30, 1)}  # fmt: skip
