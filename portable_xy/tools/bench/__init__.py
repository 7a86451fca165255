"""``portable-xy bench``: kernel micro-benchmarks, report comparison, virtual-padding analysis,
offline end-to-end throughput, a client for OpenAI-compatible servers, and the scheduling-policy
step simulator."""

from __future__ import annotations

import argparse


def add_bench_command(subparsers) -> argparse.ArgumentParser:
    """Register ``bench {kernels, compare, padding, moe-padding, e2e, serve, simulate}`` on the
    top-level subparsers."""
    from .compare import add_compare_command
    from .e2e import add_e2e_command
    from .kernels import add_kernels_command
    from .moe_padding import add_moe_padding_command
    from .padding import add_padding_command
    from .serve import add_serve_bench_command
    from .sim_report import add_simulate_command

    bench = subparsers.add_parser("bench", help="benchmarks: kernels, compare, padding, moe-padding, e2e, serve, "
                                  "simulate")  # fmt: skip
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    add_kernels_command(bsub)
    add_compare_command(bsub)
    add_padding_command(bsub)
    add_moe_padding_command(bsub)
    add_e2e_command(bsub)
    add_serve_bench_command(bsub)
    add_simulate_command(bsub)
    return bench
