"""Device detection through the platforms (``backends/platforms/``): which device a backend runs on,
its architecture name and its profile.

Architecture names and their profile files (``profiles/<vendor>/<arch>.yaml``) are each platform's
(:meth:`Platform.arch_name`). An architecture without a shipped file of its own falls back to
``<vendor>/default.yaml``; a tuned file for it (``portable-xy kernels tune``) is still layered on
top, under its own name. So a tuning always lands in the file the backend reads on the same device.
"""

from __future__ import annotations

from pathlib import Path

from .platforms import DeviceInfo, get_platform, platform_for_vendor, resolve_backend_name
from .platforms.ascend import ascend_arch
from .platforms.cpu import cpu_name
from .platforms.cuda import cuda_arch


def shipped_arch_file(vendor: str, arch: str | None) -> Path | None:
    """The shipped ``profiles/<vendor>/<arch>.yaml``, or None when the vendor default applies."""
    return platform_for_vendor(vendor).shipped_arch_file(arch)


def detect(backend: str) -> DeviceInfo:
    """The device of ``backend``; a clear error when it is not there."""
    platform = get_platform(backend)
    platform.require()
    return platform.detect()


__all__ = ["DeviceInfo", "ascend_arch", "cpu_name", "cuda_arch", "detect",
           "resolve_backend_name", "shipped_arch_file"]  # fmt: skip
