"""SamplingParams with vLLM's fields, defaults and meanings, validated on construction."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from enum import IntEnum


class RequestOutputKind(IntEnum):
    """What the engine returns for a request while it runs (vLLM's values): everything so far at
    every step, only what is new since the last output, or one output when it finishes."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """How to sample one request. Defaults match vLLM (``temperature=1.0``, ``max_tokens=16``).

    ``temperature=0`` is greedy; ``top_k=-1`` (or 0) and ``top_p=1`` disable those filters;
    ``min_p=0`` disables min-p; ``logprobs=k`` returns the sampled token's log-probability plus
    the top-k alternatives per generated token (from the raw model distribution);
    ``prompt_logprobs=k`` (``-1``: the whole vocabulary) returns, in ``RequestOutput.prompt_logprobs``,
    each prompt token's log-probability and rank plus the top-k alternatives at its position (the
    first token's entry is None). Such a request computes its whole prompt: it takes no prefix-cache
    hits.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    _stop_strs: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __init__(self, **kwargs) -> None:
        names = [f.name for f in fields(self) if f.init]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"SamplingParams got unknown argument(s) {unknown}; valid ones: {names}")
        for f in fields(self):
            if f.init:
                setattr(self, f.name, kwargs.get(f.name, f.default))
        self._verify()
        stop = self.stop
        self._stop_strs = [stop] if isinstance(stop, str) else list(stop or [])

    def clone(self, **changes) -> SamplingParams:
        """A copy with ``changes`` applied (and checked)."""
        kwargs = {f.name: copy.copy(getattr(self, f.name)) for f in fields(self) if f.init}
        return SamplingParams(**{**kwargs, **changes})

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_strs

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def can_speculate(self) -> bool:
        """Whether drafts may be verified for these params: not when sampling keeps per-token
        state (logprobs, repetition / presence / frequency penalties)."""
        return (
            self.logprobs is None
            and self.repetition_penalty == 1.0
            and not self.presence_penalty
            and not self.frequency_penalty
        )

    def _verify(self) -> None:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {want}, got {getattr(self, name)!r}")

        def check_type(name: str, types: tuple, optional: bool = False) -> None:
            val = getattr(self, name)
            if optional and val is None:
                return
            if isinstance(val, bool) and bool not in types or not isinstance(val, types):
                kinds = " or ".join(t.__name__ for t in types) + (" or None" if optional else "")
                raise TypeError(f"SamplingParams.{name} must be {kinds}, got {type(val).__name__} ({val!r})")

        for name in ("n", "top_k", "min_tokens"):
            check_type(name, (int,))
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            check_type(name, (int, float))
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            check_type(name, (int,), optional=True)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            check_type(name, (bool,))
        if not isinstance(self.output_kind, RequestOutputKind):
            raise TypeError(f"SamplingParams.output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        if self.n < 1:
            raise bad("n", "must be at least 1")
        if self.temperature < 0:
            raise bad("temperature", "must be non-negative")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1 (disable), 0 (disable) or a positive integer")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be greater than zero")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be non-negative")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be at most max_tokens={self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise bad("logprobs", "must be non-negative")
        if self.prompt_logprobs is not None and self.prompt_logprobs < -1:
            raise bad("prompt_logprobs", "must be non-negative or -1 (the whole vocabulary)")
        stop = self.stop
        if stop is not None and not isinstance(stop, str):
            if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
                raise TypeError(f"SamplingParams.stop must be a str or a list of str, got {stop!r}")
        if any(s == "" for s in ([stop] if isinstance(stop, str) else stop or [])):
            raise bad("stop", "must not contain empty strings")
        ids = self.stop_token_ids
        if ids is not None and (
            not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise TypeError(f"SamplingParams.stop_token_ids must be a list of int, got {ids!r}")
        self.stop_token_ids = list(ids or [])
