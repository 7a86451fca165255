"""The OpenAI-compatible HTTP server (FastAPI + uvicorn, as vLLM's) over an
:class:`~portable_xy.async_llm.AsyncLLM`.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /health``, ``GET /version``, ``POST /tokenize``, ``POST /detokenize`` and ``GET /metrics``
(Prometheus text under vLLM's metric names). Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 for bad parameters or bodies, 401 for a
wrong API key (``--api-key``; ``/v1`` routes only), 404 for an unknown model or route, 503 when
the waiting queue is full (``--max-waiting-requests``). A client that disconnects aborts its
request.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..async_llm import AsyncLLM
from ..metrics import PrometheusStatLogger
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .serving import OpenAIServing


def build_app(
    engine: AsyncLLM,
    served_model_names: list[str],
    api_key: str | None = None,
    metrics: PrometheusStatLogger | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``served_model_names[0]`` (and its aliases);
    ``metrics``: the engine's stat logger, rendered at ``/metrics``."""
    app = FastAPI(title="portable_xy", version=__version__)
    serving = OpenAIServing(engine, served_model_names[0])

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error(APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}"))
        where = ".".join(loc) or "body"
        return error(APIError(400, f"{where}: {first.get('msg', 'invalid value')}", loc[0] if loc else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException):
        return error(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, e: Exception):
        return error(APIError(500, f"{type(e).__name__}: {e}"))

    async def authorized(request: Request) -> None:
        if api_key is not None:
            header = request.headers.get("authorization", "")
            if not secrets.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
                raise APIError(401, "Unauthorized: a valid API key is needed (Authorization: Bearer ...)")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    def check_model(name: str | None) -> None:
        if name is not None and name not in served_model_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")

    async def respond(request: Request, work: Awaitable[tuple[dict | None, AsyncIterator[str] | None]]):
        body, stream = await until_disconnect(request, work)
        if stream is not None:
            return StreamingResponse(stream, media_type="text/event-stream")
        return JSONResponse(body)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @v1.get("/models")
    async def models():
        cards = [{"id": name, "object": "model", "created": 0, "owned_by": "portable_xy",
                  "root": str(engine.config.model_path), "max_model_len": engine.config.max_model_len}
                 for name in served_model_names]  # fmt: skip
        return {"object": "list", "data": cards}

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        return await respond(request, serving.completion(req))

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        return await respond(request, serving.chat(req))

    app.include_router(v1)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        inputs = engine.input_processor
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
        if req.messages is not None:
            conv = [{"role": m.role, "content": m.text()} for m in req.messages]
            try:
                tokens = inputs.encode(inputs.render_chat(conv, req.add_generation_prompt), add_special_tokens=False)
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
        else:
            tokens = inputs.encode(req.prompt, req.add_special_tokens)
        return {"count": len(tokens), "max_model_len": engine.config.max_model_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        vocab = engine.config.model_config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": engine.input_processor.decode(req.tokens)}

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            raise APIError(404, "metrics are off")
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def until_disconnect(request, work: Awaitable):
    """Await ``work``; if the client disconnects first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        raise APIError(499, "the client disconnected")
    return task.result()
