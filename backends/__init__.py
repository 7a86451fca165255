"""Backend layer: pick CPU (torch), the Triton interpreter, CUDA or Ascend NPU, plus its profile."""

from __future__ import annotations

import torch

from .base import AttnMetadata, Backend
from .profile import Profile, load_profile

BACKENDS = ("auto", "cpu", "interpret", "cuda", "npu")


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return bool(torch.npu.is_available())


def resolve_backend_name(name: str) -> str:
    """``auto`` picks cuda, then npu, then cpu."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {list(BACKENDS)}")
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if _npu_available():
        return "npu"
    return "cpu"


def get_backend(name: str = "auto") -> Backend:
    """Build the backend object (device + resolved profile + ops) for ``name``."""
    name = resolve_backend_name(name)
    if name == "cpu":
        from .cpu import CpuBackend

        profile = load_profile("cpu")
        if profile.data.get("num_cores_from") == "cpu_threads":
            profile = profile.with_num_cores(torch.get_num_threads())
        return CpuBackend(torch.device("cpu"), profile)
    from .triton_backend import make_triton_backend

    return make_triton_backend(name)


__all__ = ["AttnMetadata", "Backend", "Profile", "get_backend", "load_profile", "resolve_backend_name"]
