"""CPUs: torch with the C kernels of ``backends/cpu_native``; gloo collectives; profile
``backends/profiles/cpu.yaml``."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from .interface import DeviceInfo, Platform


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU has native bf16 dot products (AVX512-BF16 or AMX), from ``/proc/cpuinfo``."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuPlatform(Platform):
    name = "cpu"
    vendor = "cpu"
    device_type = "cpu"
    core_source = "cpu_threads"
    host_threads = True

    def detect(self) -> DeviceInfo:
        return DeviceInfo(self.name, torch.device("cpu"), cpu_name(), None, torch.get_num_threads())

    def default_dtype(self) -> torch.dtype:
        """bf16 on CPUs with native bf16 dot products (AVX512-BF16 or AMX), else fp32."""
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32

    def set_device(self, index: int) -> None:
        pass
