"""``/v1/completions`` and ``/v1/chat/completions`` on an :class:`~portable_xy.async_llm.AsyncLLM`:
OpenAI request bodies into engine requests, engine outputs into OpenAI responses, or into
Server-Sent Events exactly as OpenAI streams them (``data: {chunk}`` lines, a last chunk with
``finish_reason``, an optional usage chunk, then ``data: [DONE]``)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..async_llm import AsyncLLM, EngineOverloadedError, RequestStream
from ..engine.input_processor import ProcessedPrompt, PromptTooLongError
from ..engine.llm_engine import EngineStepError
from ..outputs import CompletionOutput, Logprob, RequestOutput
from ..sampling_params import SamplingParams
from .protocol import APIError, ChatCompletionRequest, CompletionRequest


def bad_request(e: Exception) -> APIError:
    """A ValueError / TypeError from the engine's checks as a 400 naming the field it names."""
    msg = str(e)
    param = None
    if msg.startswith("SamplingParams."):
        param = msg.split(".", 1)[1].split(" ", 1)[0]
    return APIError(400, msg, param)


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``(stream index, output)`` from several request streams, as they arrive. When it ends, early
    or not, every stream is closed, which aborts the requests still running."""
    if len(streams) == 1:  # the common case: no pump task, no second queue
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:  # also when the consumer stops early (a client that went away): abort what still runs
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIServing:
    """The two generation endpoints over one engine serving ``model_name``."""

    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.config.max_model_len

    # ---- request -> engine ---------------------------------------------------------------------
    def _check_length(self, prompt: ProcessedPrompt, max_tokens: int | None) -> None:
        n = len(prompt[1])
        if max_tokens is not None and n + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the completion). Please reduce "
                "the length of the prompt or the completion.",
                "max_tokens",
            )

    def _prepare(self, prompts: list[Any], params: SamplingParams) -> list[ProcessedPrompt]:
        try:
            items = [self.engine.input_processor.prompt(p, i) for i, p in enumerate(prompts)]
        except PromptTooLongError as e:
            raise APIError(400, f"{e}: this model's maximum context length is {self.max_model_len} tokens",
                           "prompt") from None  # fmt: skip
        except (ValueError, TypeError) as e:
            raise bad_request(e) from None
        for item in items:
            self._check_length(item, params.max_tokens)
        return items

    def _streams(
        self, request_id: str, items: list[ProcessedPrompt], params: SamplingParams, priority: int
    ) -> list[RequestStream]:
        """Queue one engine request per prompt, all or none (a full waiting queue is a 503)."""
        streams = []
        try:
            for i, (text, ids) in enumerate(items):
                prompt = {"prompt": text, "prompt_token_ids": ids}
                streams.append(self.engine.add_request(prompt, params, f"{request_id}-{i}", priority))
        except EngineOverloadedError as e:
            for stream in streams:
                stream.close()
            raise APIError(503, str(e)) from None
        return streams

    # ---- completions -------------------------------------------------------------------------
    def _completion_prompts(self, req: CompletionRequest) -> list[Any]:
        p = req.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": p}]
        if all(isinstance(x, str) for x in p):
            return list(p)
        return [{"prompt_token_ids": x} for x in p]

    async def completion(self, req: CompletionRequest) -> tuple[dict[str, Any] | None, AsyncIterator[str] | None]:
        """``(response body, None)``, or ``(None, SSE lines)`` for ``stream=true``."""
        req.check_supported()
        try:
            params = req.sampling_params(req.max_tokens, req.logprobs)
            if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get logprobs too
                params = params.clone(prompt_logprobs=req.logprobs)
        except (ValueError, TypeError) as e:
            raise bad_request(e) from None
        items = self._prepare(self._completion_prompts(req), params)
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = self._streams(rid, items, params, req.priority)
        if req.stream:
            return None, self._completion_stream(req, rid, created, items, params, streams)
        finals: dict[int, RequestOutput] = {}
        async for i, out in _merge(streams):
            finals[i] = out
        choices = []
        for i, (text, _) in enumerate(items):
            out = finals[i]
            for c in sorted(out.outputs, key=lambda c: c.index):
                body = (text or "") + c.text if req.echo else c.text
                lps, ids = c.logprobs, c.token_ids
                if out.prompt_logprobs is not None and lps is not None:  # echo: the prompt's tokens first
                    lps, ids = out.prompt_logprobs + lps, out.prompt_token_ids + ids
                choices.append({"index": i * params.n + c.index, "text": body,
                                "logprobs": self._completion_logprobs(lps, ids, 0),
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})  # fmt: skip
        choices.sort(key=lambda c: c["index"])
        usage = self._usage(items, [c.token_ids for out in finals.values() for c in out.outputs])
        body = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": usage}  # fmt: skip
        return body, None

    async def _completion_stream(self, req, rid, created, items, params, streams) -> AsyncIterator[str]:
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        generated = 0
        offsets: dict[int, int] = {}
        try:
            if req.echo and params.prompt_logprobs is None:
                for i, (text, _) in enumerate(items):
                    for j in range(params.n):
                        choice = {"index": i * params.n + j, "text": text or "", "logprobs": None,
                                  "finish_reason": None}  # fmt: skip
                        yield _sse({**head, "choices": [choice]})
            async for i, out in _merge(streams):
                if out.prompt_logprobs:  # echo with logprobs: a prompt's chunk comes with its first output
                    lp = self._completion_logprobs(out.prompt_logprobs, out.prompt_token_ids, 0)
                    for j in range(params.n):
                        offsets[i * params.n + j] = sum(len(t) for t in lp["tokens"])
                        choice = {"index": i * params.n + j, "text": items[i][0] or "", "logprobs": lp,
                                  "finish_reason": None}  # fmt: skip
                        yield _sse({**head, "choices": [choice]})
                for c in out.outputs:
                    index = i * params.n + c.index
                    generated += len(c.token_ids)
                    if not c.text and not c.token_ids and c.finish_reason is None:
                        continue
                    lp = self._completion_logprobs(c.logprobs, c.token_ids, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(c.text)
                    choice = {"index": index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason,
                              "stop_reason": c.stop_reason}  # fmt: skip
                    yield _sse({**head, "choices": [choice]})
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(items, generated)})
        except EngineStepError as e:
            yield _sse(APIError(500, str(e)).body())
        yield "data: [DONE]\n\n"

    def _completion_logprobs(self, logprobs: list[dict[int, Logprob]] | None, token_ids: list[int], offset: int):
        """The legacy completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset)."""
        if logprobs is None:
            return None
        tokens, token_lps, tops, offsets = [], [], [], []
        for tok, entry in zip(token_ids, logprobs):
            if entry is None:  # an echoed prompt's first token: nothing scores it
                text = self._token_text(tok)
                tokens.append(text)
                token_lps.append(None)
                tops.append(None)
                offsets.append(offset)
                offset += len(text)
                continue
            chosen = entry[tok]
            text = chosen.decoded_token or ""
            tokens.append(text)
            token_lps.append(chosen.logprob)
            tops.append({(lp.decoded_token or ""): lp.logprob for _, lp in _by_rank(entry)})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _token_text(self, token_id: int) -> str:
        inputs = self.engine.input_processor
        return "" if inputs.tokenizer is None else inputs.decode([token_id], skip_special_tokens=False)

    # ---- chat --------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest) -> tuple[dict[str, Any] | None, AsyncIterator[str] | None]:
        req.check_supported()
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", "messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        try:
            params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
            conv = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
            prompt = self.engine.input_processor.chat(conv, req.add_generation_prompt, req.chat_template)[0]
        except APIError:
            raise
        except (ValueError, TypeError) as e:
            raise bad_request(e) from None
        except Exception as e:  # noqa: BLE001 - a chat template that cannot render these messages
            raise APIError(400, f"the chat template failed on these messages: {type(e).__name__}: {e}",
                           "messages") from None  # fmt: skip
        items = self._prepare([prompt], params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = self._streams(rid, items, params, req.priority)
        if req.stream:
            return None, self._chat_stream(req, rid, created, items, params, streams[0])
        final = None
        async for _, out in _merge(streams):
            final = out
        choices = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                            "logprobs": self._chat_logprobs(c, req.top_logprobs or 0),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})  # fmt: skip
        usage = self._usage(items, [c.token_ids for c in final.outputs])
        body = {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": usage}  # fmt: skip
        return body, None

    async def _chat_stream(self, req, rid, created, items, params, stream) -> AsyncIterator[str]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        generated = 0
        try:
            for j in range(params.n):
                choice = {"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}  # fmt: skip
                yield _sse({**head, "choices": [choice]})
            async for _, out in _merge([stream]):
                for c in out.outputs:
                    generated += len(c.token_ids)
                    if c.text or c.token_ids:
                        choice = {
                            "index": c.index,
                            "delta": {"content": c.text} if c.text else {},
                            "logprobs": self._chat_logprobs(c, req.top_logprobs or 0),
                            "finish_reason": None,
                        }
                        yield _sse({**head, "choices": [choice]})  # fmt: skip
                    if c.finish_reason is not None:
                        choice = {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason}  # fmt: skip
                        yield _sse({**head, "choices": [choice]})
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(items, generated)})
        except EngineStepError as e:
            yield _sse(APIError(500, str(e)).body())
        yield "data: [DONE]\n\n"

    def _chat_logprobs(self, c: CompletionOutput, top: int) -> dict[str, Any] | None:
        if c.logprobs is None:
            return None
        content = []
        for tok, entry in zip(c.token_ids, c.logprobs):
            chosen = entry[tok]
            alts = [{"token": lp.decoded_token or "", "logprob": lp.logprob,
                     "bytes": list((lp.decoded_token or "").encode())} for _, lp in _by_rank(entry)[:top]]  # fmt: skip
            text = chosen.decoded_token or ""
            content.append({"token": text, "logprob": chosen.logprob, "bytes": list(text.encode()),
                            "top_logprobs": alts})  # fmt: skip
        return {"content": content}

    @staticmethod
    def _usage(items: list[ProcessedPrompt], generated: int | list[list[int]]) -> dict[str, int]:
        prompt = sum(len(ids) for _, ids in items)
        completion = generated if isinstance(generated, int) else sum(len(t) for t in generated)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _by_rank(entry: dict[int, Logprob]) -> list[tuple[int, Logprob]]:
    return sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
