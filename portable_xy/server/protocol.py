"""The OpenAI API's request bodies (with vLLM's extra sampling fields) and its error shape.

Types are checked by pydantic; values by :class:`~portable_xy.sampling_params.SamplingParams`, so
the HTTP API and ``LLM.generate`` accept and refuse the same things. Fields the engine does not
implement are refused with a 400 naming them rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..sampling_params import RequestOutputKind, SamplingParams


class APIError(Exception):
    """An error with its HTTP status, answered as ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
             413: "RequestTooLargeError", 429: "RateLimitError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}  # fmt: skip

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}  # fmt: skip


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both bodies share: OpenAI's and vLLM's extra sampling parameters. Unknown fields are
    kept (``model_extra``) so that the ones this server does not implement can be refused by name."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # vLLM's extras
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0

    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "logit_bias", "suffix", "tools", "tool_choice", "functions", "response_format",
    )  # fmt: skip

    def check_supported(self) -> None:
        extra = self.model_extra or {}
        for name in self.UNSUPPORTED:
            if extra.get(name) is not None:
                raise APIError(400, f"'{name}' is not supported by this server", name)
        if extra.get("best_of") not in (None, self.n):
            raise APIError(400, f"best_of={extra['best_of']} is not supported (only best_of == n)", "best_of")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The request's ``SamplingParams`` (a ValueError / TypeError names a bad field)."""
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, stop_token_ids=self.stop_token_ids, max_tokens=max_tokens, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )  # fmt: skip

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (content parts of type ``text`` joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"content part of type {part.get('type')!r} is not supported (text only)",
                               "messages")  # fmt: skip
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    chat_template: str | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    model: str | None = None
    tokens: list[int]
