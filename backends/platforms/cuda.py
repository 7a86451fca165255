"""NVIDIA GPUs: ``torch.cuda`` (CUDA builds of torch), NCCL, CUDA graphs, Triton's ``cuda`` target.

Architecture names are ``sm<major><minor>`` (``sm80``, ``sm90``, ``sm89``...); profiles in
``backends/profiles/cuda/``.
"""

from __future__ import annotations

import importlib.util
import itertools
from types import ModuleType
from typing import Any

import torch

from ..profile import Profile
from .interface import DeviceInfo, Platform, run_quiet

# opt-in shared memory per thread block (bytes)
SMEM_PER_BLOCK = {"sm75": 65536, "sm80": 166912, "sm86": 101376, "sm89": 101376, "sm90": 232448}


def cuda_arch(capability: int | tuple[int, int]) -> str:
    """``90`` or ``(9, 0)`` -> ``sm90``."""
    if isinstance(capability, tuple):
        capability = capability[0] * 10 + capability[1]
    return f"sm{int(capability)}"


class CudaPlatform(Platform):
    name = "cuda"
    vendor = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    collective_library = "NCCL"
    core_source = "sm_count"
    runs_triton = True
    graph_capture = True
    hf_on_device = True
    event_timer = "cuda_event"
    blas_name = "cuBLAS"
    default_arch = "sm80"
    tune_gemm_shapes = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]
    tune_ms = [1, 16, 64, 256, 1024, 4096]
    tune_kv_tiles = [32, 64, 128]
    aot_archs = ("sm80", "sm90")

    def require(self) -> None:
        if not torch.cuda.is_available() or torch.version.hip is not None:
            raise RuntimeError(
                f"backend {self.name!r} needs an NVIDIA GPU visible to a CUDA build of torch "
                f"(torch.cuda.is_available() is {torch.cuda.is_available()}, torch.version.hip is {torch.version.hip})"
            )

    triton_backend = "cuda"  # the Triton driver's backend name

    def detect(self) -> DeviceInfo:
        dev = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(dev)
        return DeviceInfo(self.name, dev, props.name, self.arch_name(self.raw_arch(props)), props.multi_processor_count)

    def raw_arch(self, props: Any) -> Any:
        """The device-properties field :meth:`arch_name` names."""
        return (props.major, props.minor)

    def arch_name(self, raw: Any) -> str | None:
        return cuda_arch(raw)

    def check_triton(self) -> None:
        import triton

        target = triton.runtime.driver.active.get_current_target()
        if target.backend != self.triton_backend:
            got, want = target.backend, self.triton_backend
            raise RuntimeError(f"backend {self.name!r}: the active Triton driver targets {got!r}, not {want!r}")

    def device_module(self) -> ModuleType:
        return torch.cuda

    def graph_api(self) -> tuple[ModuleType, type]:
        return torch.cuda, torch.cuda.CUDAGraph

    def triton_target(self, arch: str) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", int(arch.removeprefix("sm")), 32)

    def smem_per_block(self, arch: str | None) -> int:
        return SMEM_PER_BLOCK.get(arch or "", SMEM_PER_BLOCK["sm86"])

    def candidate_gemm_tiles(self, profile: Profile, arch: str | None) -> list[dict]:
        limit = self.smem_per_block(arch)
        pool = []
        for bm, bn, bk in itertools.product((16, 32, 64, 128), (64, 128, 256), (32, 64)):
            warps = 4 if bm * bn <= 64 * 128 else 8
            if bm * bn // (32 * warps) > 128:  # fp32 accumulator registers per thread
                continue
            for stages in (4, 3, 2):
                if (bm + bn) * bk * 2 * stages <= 0.9 * limit:
                    pool.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
                    break
        return pool

    def environment(self, device: torch.device) -> dict[str, Any]:
        return {
            "device": torch.cuda.get_device_name(device),
            "driver": run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "cuda": torch.version.cuda,
        }

    def device_properties(self, device: torch.device) -> dict[str, Any]:
        p = torch.cuda.get_device_properties(device)
        return {"sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1)}  # fmt: skip

    def vendor_attention(self, q, k_cache, v_cache, meta, scale, gathered):
        if importlib.util.find_spec("flash_attn") is None:
            return None
        from flash_attn import flash_attn_varlen_func

        k = torch.cat([p[1] for p in gathered])
        v = torch.cat([p[2] for p in gathered])
        cu_k = torch.tensor([0, *torch.tensor(meta.seq_lens_cpu).cumsum(0).tolist()], dtype=torch.int32,
                            device=q.device)  # fmt: skip
        cu_q = meta.query_start_loc

        def run():  # causal masks align bottom-right (flash-attn >= 2.1): history columns stay visible
            return flash_attn_varlen_func(
                q, k, v, cu_q, cu_k, meta.max_query_len, meta.max_seq_len, softmax_scale=scale, causal=True
            )

        return run, "flash-attn varlen (gathered KV)"
