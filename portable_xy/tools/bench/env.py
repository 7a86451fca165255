"""Where a benchmark ran: device, driver, library versions, profile, peaks, and the timer."""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import torch

from ...backends.device import cpu_name
from ...backends.platforms import platform_for_device
from ...backends.roofline import datasheet_peaks


def profile_name(profile) -> str:
    """``cuda/sm90``, ``ascend/910b``, ``cuda/default``, ``cpu``, ``interpret``."""
    if profile.vendor in ("cpu", "interpret"):
        return profile.vendor
    return f"{profile.vendor}/{profile.arch or 'default'}"


def device_peaks(profile, dtype: torch.dtype) -> tuple[float | None, float | None]:
    """(peak TFLOP/s for ``dtype``, peak GB/s) from the profile's ``device`` section (None: absent)."""
    return datasheet_peaks(profile, dtype)


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
    env.update(platform_for_device(device).environment(device))
    return env


def make_timer(device: torch.device, warmup: int, reps: int) -> tuple[Callable[[Callable[[], Any]], float], str]:
    """``(timer, method)``: ``timer(fn)`` is the median seconds of ``reps`` calls after ``warmup``
    (the platform's timer, as the offline tuner's): device events where the device has them,
    ``time.perf_counter`` on CPU."""
    platform = platform_for_device(device)
    return platform.make_timer(warmup, reps), platform.event_timer or "perf_counter"
