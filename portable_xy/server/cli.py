"""``portable-xy serve [MODEL]``: the flags (``vllm serve``'s names, one per
:class:`~portable_xy.config.EngineConfig` field) and the server's start-up. The server itself is
``api_server.py``, imported only when the command runs."""

from __future__ import annotations

import argparse

from ..config import EngineConfig
from ..engine_args import add_engine_args, engine_kwargs


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server",
        description="Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, "
        "/tokenize, /detokenize, /health, /metrics).",
    )  # fmt: skip
    p.add_argument("model", nargs="?", default=None, help="model path or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--model", dest="model_flag", default=None, help="same as the positional MODEL")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", nargs="+", default=None, help="model name(s) in the API")
    p.add_argument("--max-waiting-requests", type=int, default=None,
                   help="answer 503 once this many requests wait for their first step")  # fmt: skip
    p.add_argument("--uvicorn-log-level", default="warning")
    add_engine_args(p, model=False)
    p.set_defaults(func=serve)
    return p


def serve(args: argparse.Namespace) -> int:
    """Build the engine, serve HTTP from a second thread, and run the engine loop on this (the main)
    thread until SIGINT / SIGTERM or the HTTP server stops."""
    import signal
    import threading

    import uvicorn

    from ..async_llm import AsyncLLM
    from ..metrics import PrometheusStatLogger
    from .api_server import build_app

    model = args.model or args.model_flag
    config = EngineConfig(**engine_kwargs(args, model=model))
    served = args.served_model_name or [str(model) if model else "SmolLM2-135M-Instruct"]
    metrics = PrometheusStatLogger(served[0])
    engine = AsyncLLM.from_config(config, args.max_waiting_requests, [metrics], start_thread=False)
    app = build_app(engine, served, args.api_key, metrics)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level))

    def http() -> None:
        try:
            server.run()  # outside the main thread uvicorn installs no signal handlers of its own
        finally:
            engine.shutdown()

    def stop(*_) -> None:
        server.should_exit = True
        engine.shutdown()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    thread = threading.Thread(target=http, name="portable_xy-http")
    thread.start()
    print(f"serving {served[0]} on http://{args.host}:{args.port}/v1 (backend={config.backend}, "
          f"dtype={str(config.dtype).removeprefix('torch.')})", flush=True)  # fmt: skip
    try:
        engine.run()
    finally:
        server.should_exit = True
        thread.join(30)
    return 0 if engine.dead_error is None else 1
