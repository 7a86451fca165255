"""The Triton interpreter (``TRITON_INTERPRET=1``) on the CPU: the Triton kernels run as numpy,
without a device; profile ``backends/profiles/interpret.yaml``."""

from __future__ import annotations

import platform

import torch

from .interface import DeviceInfo, Platform


class InterpretPlatform(Platform):
    name = "interpret"
    vendor = "interpret"
    device_type = "cpu"
    runs_triton = True
    triton_interpreted = True
    host_threads = True
    tune_ms = [1, 24]
    tune_kv_tiles = [16, 32]
    tune_gemm_shapes = [(96, 64), (64, 96)]

    def detect(self) -> DeviceInfo:
        return DeviceInfo(self.name, torch.device("cpu"), f"Triton interpreter ({platform.machine()} CPU)")

    def default_dtype(self) -> torch.dtype:
        return torch.float32  # the interpreter has no bf16

    def set_device(self, index: int) -> None:
        pass
