"""Tooling that never runs while serving: the kernel AOT report (``aot.py``, specs in
``aot_specs.py``), the offline tile tuner (``tune.py``), the benchmarks (``bench/``), the timer
they share (the platform's ``make_timer``) and the hardware validation kit (``selfcheck/``). The
``portable-xy kernels``, ``bench`` and ``selfcheck`` commands live here; ``portable_xy.cli``
imports this package only for them."""

from __future__ import annotations

import argparse


def add_tool_commands(subparsers) -> None:
    """Register ``kernels {aot-report, tune}`` and ``bench {...}`` on the top-level subparsers."""
    from .aot import add_aot_report_command
    from .bench import add_bench_command
    from .selfcheck import add_selfcheck_command
    from .tune import add_tune_command

    kernels: argparse.ArgumentParser = subparsers.add_parser(
        "kernels", help="Triton kernel tooling (AOT report, offline tuner)"
    )
    ksub = kernels.add_subparsers(dest="kernels_command", required=True)
    add_aot_report_command(ksub)
    add_tune_command(ksub)
    add_bench_command(subparsers)
    add_selfcheck_command(subparsers)
