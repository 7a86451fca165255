"""AMD GPUs: ROCm builds of torch run through ``torch.cuda`` with ``torch.version.hip`` set;
collectives on RCCL (torch.distributed's ``nccl`` backend), HIP graphs through ``torch.cuda``'s
graph API, Triton's ``hip`` target (hsaco).

Architecture names are the gfx ISA names without target features (``gfx942`` for MI300X,
``gfx90a`` for MI250X, ``gfx1100`` for RDNA3); profiles in ``backends/profiles/rocm/``. Wave size,
LDS, CU count and peaks are profile data (``device:``).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from ..profile import Profile, load_profile
from .cuda import CudaPlatform
from .interface import run_quiet


def gfx_arch(name: str) -> str | None:
    """``gfx942:sramecc+:xnack-`` -> ``gfx942``; ``None`` for an empty name."""
    s = str(name).strip().lower().split(":", 1)[0]
    return s or None


class RocmPlatform(CudaPlatform):
    """ROCm keeps CUDA's torch module, graph API, events and device properties; what differs is
    here."""

    name = "rocm"
    vendor = "rocm"
    # the device type, dist backend (torch's nccl is RCCL in ROCm builds), core source (torch's
    # multi_processor_count counts CUs), graphs and tuning ranges are CUDA's
    collective_library = "RCCL"
    event_timer = "hip_event"
    blas_name = "hipBLASLt"
    triton_backend = "hip"
    default_arch = "gfx942"
    tune_kv_tiles = [16, 32]  # 64 spills on CDNA and RDNA3 (kernels aot-report; profiles/rocm/default.yaml)
    aot_archs = ("gfx942", "gfx90a", "gfx1100")

    def require(self) -> None:
        if torch.version.hip is None or not torch.cuda.is_available():
            raise RuntimeError(
                f"backend {self.name!r} needs an AMD GPU visible to a ROCm build of torch "
                f"(torch.version.hip is {torch.version.hip}, torch.cuda.is_available() is {torch.cuda.is_available()})"
            )

    def raw_arch(self, props: Any) -> Any:
        return getattr(props, "gcnArchName", "")

    def arch_name(self, raw: Any) -> str | None:
        return gfx_arch(raw)

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
