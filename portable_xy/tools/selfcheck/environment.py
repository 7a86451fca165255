"""Stage 1, environment: the device (name, SM / AI-core count, driver), torch / Triton versions, and
the profile the backend chose, with the files it merged and why."""

from __future__ import annotations

from typing import Any

from ...backends.device import detect, shipped_arch_file
from ..bench.env import environment
from .report import Stage


def run(stage: Stage, backend: str) -> Any:
    """Detect the device and build the backend; returns the backend (None if that failed)."""
    from ...backends import get_backend

    info = detect(backend)
    be = get_backend(backend)
    prof = be.profile
    env = environment(backend, be.device, prof)
    env["arch"] = info.arch
    env["detected_num_cores"] = info.num_cores
    env.update(be.platform.device_properties(be.device))
    shipped = shipped_arch_file(info.vendor, info.arch) if info.arch else None
    if prof.tuned:
        reason = f"a tuned file for this device ({prof.tuned.get('device')}) over the shipped profile"
    elif shipped is not None:
        reason = f"the shipped profile of arch {info.arch}"
    elif info.arch:
        reason = f"no profile for arch {info.arch}: the vendor default"
    else:
        reason = "no architecture-specific profile applies: the vendor default"
    env["profile_reason"] = reason
    env["profile_triton_overrides"] = prof.triton_overrides
    stage.data["env"] = env
    stage.check("device detected", True, f"{env['device']}, profile {env['profile']} ({reason})")
    stage.check("profile has tiles", bool(prof.gemm.get("tiles")) and bool(prof.attention.get("q_tiles")),
                f"{len(prof.gemm.get('tiles', []))} GEMM tiles, q tiles {prof.attention.get('q_tiles')}")  # fmt: skip
    return be
