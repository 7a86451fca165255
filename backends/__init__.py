"""Backend layer: pick CPU (torch + C), the Triton interpreter, CUDA, ROCm or Ascend NPU, plus its profile.

=====================  =================================================================
module                 what
=====================  =================================================================
``base.py``            the op interface (:class:`Backend`) and the step's token table
``reference.py``       the pure torch definition of every op: the oracle of every test
``cpu.py``             the ``cpu`` backend: torch ops with C fast paths (``cpu_native``)
``triton_backend.py``  the ``interpret``, ``cuda``, ``rocm`` and ``npu`` backends (Triton kernels)
``platforms/``         one :class:`Platform` per vendor: every vendor fact (device module, collectives,
                       graphs, arch names, Triton targets, tuning ranges)
``device.py``          device detection through the platforms
``profile.py``         per-vendor, per-arch tuning data (YAML) and its precedence
``roofline.py``        device peaks and the roofline cost model the planners use
``graphs.py``          static-shape decode steps (device graphs)
=====================  =================================================================
"""

from __future__ import annotations

from .base import AttnMetadata, Backend
from .device import detect
from .platforms import get_platform, resolve_backend_name
from .profile import Profile, load_profile


def get_backend(name: str = "auto") -> Backend:
    """Build the backend object (device + resolved profile + ops) for ``name``."""
    name = resolve_backend_name(name)
    if get_platform(name).runs_triton:
        from .triton_backend import make_triton_backend

        return make_triton_backend(name)
    from .cpu import CpuBackend

    info = detect(name)
    return CpuBackend(info.device, info.profile())


__all__ = ["AttnMetadata", "Backend", "Profile", "get_backend", "load_profile", "resolve_backend_name"]
