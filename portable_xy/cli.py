"""The ``portable-xy`` command: generate text, and the kernel tooling subcommands."""

from __future__ import annotations

import argparse
import sys

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about a GPU and an NPU sharing one kernel.",
    "Explain paged attention in two sentences.",
    "List three prime numbers greater than 100.",
]


def _generate(args: argparse.Namespace) -> int:
    import time

    from . import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, backend=args.backend, dtype=args.dtype)
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


def build_parser() -> argparse.ArgumentParser:
    """The ``portable-xy`` argument parser with every subcommand registered."""
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
    from .backends.tuner import add_tune_command
    from .triton_kernels.aot import add_aot_report_command

    add_aot_report_command(ksub)
    add_tune_command(ksub)

    from .bench import add_bench_command

    add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
