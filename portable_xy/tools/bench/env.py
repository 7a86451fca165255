"""Where a benchmark ran: device, driver, library versions, profile, peaks, and the timer."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Callable
from typing import Any

import torch

from ...backends.device import cpu_name
from ...backends.roofline import datasheet_peaks
from ..timing import make_timer as device_timer


def profile_name(profile) -> str:
    """``cuda/sm90``, ``ascend/910b``, ``cuda/default``, ``cpu``, ``interpret``."""
    if profile.vendor in ("cpu", "interpret"):
        return profile.vendor
    return f"{profile.vendor}/{profile.arch or 'default'}"


def device_peaks(profile, dtype: torch.dtype) -> tuple[float | None, float | None]:
    """(peak TFLOP/s for ``dtype``, peak GB/s) from the profile's ``device`` section (None: absent)."""
    return datasheet_peaks(profile, dtype)


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def environment(backend: str, device: torch.device, profile) -> dict[str, Any]:
    """The ``env`` block of a report."""
    from ...backends.profile import installed_triton

    triton_pkg, triton_ver = installed_triton()
    env: dict[str, Any] = {
        "backend": backend,
        "device": f"{cpu_name()} ({torch.get_num_threads()} threads)",
        "driver": None,
        "torch": torch.__version__,
        "triton": triton_ver,
        "triton_package": triton_pkg,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "profile": profile_name(profile),
        "profile_sources": list(profile.sources),
        "num_cores": profile.num_cores,
    }
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["cuda"] = torch.version.cuda
    elif device.type == "npu":
        import torch_npu

        env["device"] = torch.npu.get_device_name(device.index or 0)
        env["driver"] = getattr(getattr(torch_npu, "version", None), "cann", None) or _run(["npu-smi", "-v"])
        env["torch_npu"] = getattr(torch_npu, "__version__", None)
    return env


def make_timer(device: torch.device, warmup: int, reps: int) -> tuple[Callable[[Callable[[], Any]], float], str]:
    """``(timer, method)``: ``timer(fn)`` is the median seconds of ``reps`` calls after ``warmup``;
    device events on cuda / npu, ``time.perf_counter`` on CPU (the offline tuner's timer)."""
    timer = device_timer(device.type, warmup, reps)
    return timer, (f"{device.type}_event" if device.type in ("cuda", "npu") else "perf_counter")
