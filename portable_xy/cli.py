"""The ``portable-xy`` command: generate text; ``kernels`` and ``bench`` are the tooling commands of
:mod:`portable_xy.tools`, imported only when one of them runs."""

from __future__ import annotations

import argparse
import sys

TOOL_COMMANDS = ("kernels", "bench", "selfcheck")  # registered by portable_xy.tools
DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about a GPU and an NPU sharing one kernel.",
    "Explain paged attention in two sentences.",
    "List three prime numbers greater than 100.",
]


def _generate(args: argparse.Namespace) -> int:
    import time

    from . import LLM, SamplingParams
    from .engine_args import engine_kwargs

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    print(
        f"loaded {args.model or 'SmolLM2-135M-Instruct (default)'} on backend={llm.backend.name} "
        f"dtype={str(llm.dtype).removeprefix('torch.')} in {time.perf_counter() - t0:.1f}s"
    )
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    prompts = args.prompt or DEMO_PROMPTS
    t0 = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        print(
            f"\n### {p}\n{c.text.strip()}\n[{len(c.token_ids)} tokens, finish={c.finish_reason}, "
            f"ttft={o.metrics.ttft * 1000:.0f} ms]"
        )
    print(f"\n{len(prompts)} requests, {n_out} output tokens in {dt:.2f}s: {n_out / dt:.1f} tok/s")
    return 0


def build_parser(tools: bool = True) -> argparse.ArgumentParser:
    """The ``portable-xy`` argument parser; ``tools=False`` leaves out the tooling commands (and
    their imports)."""
    from .engine_args import add_engine_args

    parser = argparse.ArgumentParser(prog="portable-xy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a model (default: SmolLM2-135M-Instruct)")
    add_engine_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--prompt", action="append", help="a chat prompt (repeatable); default: a built-in set")
    gen.set_defaults(func=_generate)

    from .server.cli import add_serve_command

    add_serve_command(sub)
    if tools:
        from .tools import add_tool_commands

        add_tool_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wants_tools = not argv or argv[0] in TOOL_COMMANDS or argv[0].startswith("-")
    args = build_parser(tools=wants_tools).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
