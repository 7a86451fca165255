"""Platforms: one object per vendor holding every fact about its device (see ``interface.py``).

=================  ==========  ==================  ============================================
backend name       vendor      torch device type   file
=================  ==========  ==================  ============================================
``cuda``           cuda        cuda                ``cuda.py`` (NVIDIA)
``rocm``           rocm        cuda                ``rocm.py`` (AMD; ROCm torch keeps CUDA's names)
``npu``            ascend      npu                 ``ascend.py`` (Huawei Ascend, torch_npu)
``cpu``            cpu         cpu                 ``cpu.py`` (torch + C kernels)
``interpret``      interpret   cpu                 ``interpret.py`` (the Triton interpreter)
=================  ==========  ==================  ============================================

Adding a vendor: one platform file here, its class in :data:`PLATFORMS`, one profile folder
``backends/profiles/<vendor>/`` and a row in ``docs/architecture.md``.
"""

from __future__ import annotations

import torch

from .ascend import AscendPlatform
from .cpu import CpuPlatform
from .cuda import CudaPlatform
from .interface import DeviceInfo, Platform
from .interpret import InterpretPlatform
from .rocm import RocmPlatform

# in ``backend="auto"`` order: the first available device platform wins, the CPU last
PLATFORMS: dict[str, Platform] = {
    p.name: p for p in (CudaPlatform(), RocmPlatform(), AscendPlatform(), CpuPlatform(), InterpretPlatform())
}
AUTO_ORDER = ("cuda", "rocm", "npu", "cpu")


def get_platform(name: str) -> Platform:
    """The platform of backend ``name``; a ValueError naming the choices otherwise."""
    try:
        return PLATFORMS[name]
    except KeyError:
        raise ValueError(f"backend={name!r} is not one of {sorted(PLATFORMS)}") from None


def platform_for_vendor(vendor: str) -> Platform:
    """The platform whose profiles live in ``profiles/<vendor>/``."""
    for p in PLATFORMS.values():
        if p.vendor == vendor:
            return p
    raise ValueError(f"vendor={vendor!r} is not one of {sorted(p.vendor for p in PLATFORMS.values())}")


def platform_for_device(device: torch.device | str) -> Platform:
    """The platform running torch device (type) ``device``: ``cuda`` is ROCm on a HIP build of torch."""
    kind = device if isinstance(device, str) else device.type
    if kind == "cuda":
        return PLATFORMS["rocm" if torch.version.hip is not None else "cuda"]
    for p in PLATFORMS.values():
        if p.device_type == kind:
            return p
    raise ValueError(f"no platform for device type {kind!r}")


def resolve_backend_name(name: str) -> str:
    """``auto`` picks the first available of :data:`AUTO_ORDER`; other names are checked."""
    choices = ("auto", *PLATFORMS)
    if name not in choices:
        raise ValueError(f"backend={name!r} is not one of {list(choices)}")
    if name != "auto":
        return name
    return next(n for n in AUTO_ORDER if PLATFORMS[n].is_available())


__all__ = ["PLATFORMS", "DeviceInfo", "Platform", "get_platform", "platform_for_device", "platform_for_vendor",
           "resolve_backend_name"]  # fmt: skip
