"""Backend layer: pick CPU (torch + C), the Triton interpreter, CUDA or Ascend NPU, plus its profile.

=====================  =================================================================
module                 what
=====================  =================================================================
``base.py``            the op interface (:class:`Backend`) and the step's token table
``reference.py``       the pure torch definition of every op: the oracle of every test
``cpu.py``             the ``cpu`` backend: torch ops with C fast paths (``cpu_native``)
``triton_backend.py``  the ``interpret``, ``cuda`` and ``npu`` backends (Triton kernels)
``device.py``          device detection and architecture names
``profile.py``         per-vendor, per-arch tuning data (YAML) and its precedence
``roofline.py``        device peaks and the roofline cost model the planners use
``graphs.py``          static-shape decode steps (CUDA / NPU graphs)
=====================  =================================================================
"""

from __future__ import annotations

from .base import AttnMetadata, Backend
from .device import detect, resolve_backend_name
from .profile import Profile, load_profile


def get_backend(name: str = "auto") -> Backend:
    """Build the backend object (device + resolved profile + ops) for ``name``."""
    name = resolve_backend_name(name)
    if name == "cpu":
        from .cpu import CpuBackend

        info = detect(name)
        return CpuBackend(info.device, info.profile())
    from .triton_backend import make_triton_backend

    return make_triton_backend(name)


__all__ = ["AttnMetadata", "Backend", "Profile", "get_backend", "load_profile", "resolve_backend_name"]
