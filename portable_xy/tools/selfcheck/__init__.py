"""``portable-xy selfcheck``: the hardware validation kit (``scripts/device_check.sh`` wraps it).

    portable-xy selfcheck [--backend cuda|npu|interpret] [--out DIR] [--quick] [--budget-s S]

Stages, in order, each writing ``DIR/NN_stage.json`` when it ends and a line of
``DIR/summary.md``, so that a run cut short keeps what it measured:

1. ``environment``: device, SM count, driver, torch / Triton versions, the profile and why;
2. ``kernels``: every kernel against ``backends/reference.py`` on the device, per dtype
   (``kernels.py``);
3. ``end_to_end``: random-weight tiny Llama / Qwen2 / Qwen3 and a ~1B Llama against HF on the
   same device, batch invariance, prefix caching, n-gram speculation, decode graphs
   (``end_to_end.py``);
4. ``speed``: ``bench kernels`` against the vendor libraries and ``bench e2e`` against HF
   (``speed.py``);
5. ``aot_check``: the JIT-compiled kernels' registers / spills / shared memory next to
   ``kernels aot-report`` (``aot_check.py``).

A stage that starts after the time budget (``--budget-s``; 300 s with ``--quick``, else 1100 s) is
skipped with a note. The exit status is 1 if any check failed. ``--backend interpret`` runs the
same stages on tiny shapes with CPU tensors (no bf16 there), as CI does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from ... import envs
from ...backends.platforms import PLATFORMS

TRITON_BACKENDS = [n for n, p in PLATFORMS.items() if p.runs_triton]

STAGES = ("environment", "kernels", "end_to_end", "speed", "aot_check")


def selfcheck(backend: str, out: Path, quick: bool, budget_s: float | None = None) -> int:
    """Run every stage on ``backend``; the exit status (0: every check passed)."""
    from ...backends.platforms import get_platform

    if get_platform(backend).triton_interpreted:
        envs.set_triton_interpret(True)  # before anything imports triton

    from . import aot_check, end_to_end, environment, kernels, speed
    from .report import Report

    budget = budget_s if budget_s is not None else (300.0 if quick else 1100.0)
    report = Report(out, {"backend": backend, "quick": quick, "budget_s": budget,
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, budget)  # fmt: skip
    be = None
    model_1b: Path | None = None
    with tempfile.TemporaryDirectory(prefix="pxy-selfcheck-") as work:
        for name in STAGES:
            with report.stage(name) as st:
                if be is None and name != "environment":
                    st.skip(name, "no backend (the environment stage failed)")
                    continue
                if report.left() <= 0:
                    st.skip(name, f"the time budget ({budget:.0f} s) is spent")
                    continue
                if name == "environment":
                    be = environment.run(st, backend)
                elif name == "kernels":
                    kernels.run(st, be, quick)
                elif name == "end_to_end":
                    model_1b = end_to_end.run(st, be, quick, Path(work))
                elif name == "speed":
                    speed.run(st, be, quick, report.out, model_1b)
                else:
                    aot_check.run(st, be)
            if be is not None:
                be.platform.empty_cache()
    return report.finish()


def _run_cli(args: argparse.Namespace) -> int:
    backend = args.backend or _default_backend()
    out = Path(args.out or f"selfcheck-{backend}-{time.strftime('%Y%m%d-%H%M%S')}")
    return selfcheck(backend, out, args.quick, args.budget_s)


def _default_backend() -> str:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpret"
    from ...backends.platforms import get_platform, resolve_backend_name

    name = resolve_backend_name("auto")
    return name if get_platform(name).runs_triton else "interpret"


def add_selfcheck_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("selfcheck", help="hardware validation kit: kernels, end to end, speed, AOT on a device",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--backend", choices=TRITON_BACKENDS, default=None,
                   help="default: the device found (cuda, rocm, then npu), else interpret")  # fmt: skip
    p.add_argument("--out", default=None, help="report directory (default: ./selfcheck-BACKEND-DATE)")
    p.add_argument("--quick", action="store_true", help="short shapes and one model for the speed stage")
    p.add_argument("--budget-s", type=float, default=None, help="stages starting after this are skipped")
    p.set_defaults(func=_run_cli)
    return p
