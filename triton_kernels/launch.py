"""Launch helpers shared by several kernels: grid sizes and launch/compile options from a profile."""

from __future__ import annotations

from ..envs import triton_interpret


def launch_kwargs(options: dict) -> dict:
    """Launch/compile options for ``kernel[grid](...)``; none under the interpreter (upstream's
    ignores them, but triton-ascend 3.2.0's rejects anything beyond num_warps & co., e.g.
    ``multibuffer``)."""
    if triton_interpret():
        return {}
    return dict(options)


def support_programs(n_tasks: int, profile, section: str = "support") -> int:
    """Grid size for a task loop: one program per task, or -- when the profile section says
    ``persistent`` (Ascend) -- at most ``num_cores * programs_per_core`` programs."""
    s = profile.data.get(section) or {}
    if not s.get("persistent", False):
        return max(1, n_tasks)
    cap = max(1, int(profile.num_cores) * int(s.get("programs_per_core", 1)))
    return max(1, min(n_tasks, cap))


def launch_options(profile, section: str = "support") -> dict:
    """``num_warps``/``num_stages`` (CUDA) and ``options`` (e.g. Ascend compile options) of a
    profile section; empty under the interpreter."""
    s = profile.data.get(section) or {}
    opts = dict(s.get("options") or {})
    for k in ("num_warps", "num_stages"):
        if k in s:
            opts[k] = int(s[k])
    return launch_kwargs(opts)
