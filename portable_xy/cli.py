"""The ``portable-xy`` command: generate text, and the kernel tooling subcommands."""

from __future__ import annotations

import argparse
import sys


def _generate(args: argparse.Namespace) -> int:
    from .examples_run import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="portable-xy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a model (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2)")
    gen.add_argument("--backend", default="auto")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--prompt", action="append", help="a chat prompt (repeatable); default: a built-in set")
    gen.set_defaults(func=_generate)

    kernels = sub.add_parser("kernels", help="Triton kernel tooling (AOT report, offline tuner)")
    ksub = kernels.add_subparsers(dest="kernels_command", required=True)
    from .triton_kernels.aot import add_aot_report_command

    add_aot_report_command(ksub)
    from .backends.tuner import add_tune_command

    add_tune_command(ksub)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
