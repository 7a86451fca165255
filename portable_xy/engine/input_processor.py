"""Prompts in: text, token ids or chat conversations, checked and tokenized before anything is
queued, so a bad request changes nothing. Every front end (``LLM``, ``AsyncLLM``, the server)
goes through it, as their public ``input_processor``, and hands the engine the
:class:`ProcessedPrompt` it returns: a prompt is validated and tokenized once."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence as Seq
from typing import Any, NamedTuple


class ProcessedPrompt(NamedTuple):
    """A checked prompt: its text (``None`` when given as token ids) and token ids."""

    text: str | None
    token_ids: list[int]


PromptType = str | dict[str, Any] | ProcessedPrompt


class PromptTooLongError(ValueError):
    """A prompt that leaves no room to generate under ``max_model_len``."""


class InputProcessor:
    """Checks prompts against the model's vocabulary and ``max_model_len``."""

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, lock: threading.Lock | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.lock = lock or contextlib.nullcontext()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self.lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        with self.lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def prompts(self, prompts: PromptType | Seq[PromptType]) -> list[ProcessedPrompt]:
        """:meth:`prompt` of a string, a ``{"prompt_token_ids": [...], "prompt": ...}`` dict, a
        :class:`ProcessedPrompt`, or a non-empty list of those."""
        if isinstance(prompts, (str, dict, ProcessedPrompt)):
            prompts = [prompts]
        if not isinstance(prompts, Seq) or isinstance(prompts, (bytes, bytearray)):
            raise TypeError(f"prompts must be a str, a dict or a list of those, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty")
        return [self.prompt(p, i) for i, p in enumerate(prompts)]

    def prompt(self, p: PromptType, i: int = 0) -> ProcessedPrompt:
        """One prompt (``i``: its position, for the error messages); a :class:`ProcessedPrompt`
        was checked when it was made and passes as it is."""
        if isinstance(p, ProcessedPrompt):
            return p
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompt {i} is an empty string")
            if self.tokenizer is None:
                raise ValueError(f"prompt {i} is text but no tokenizer is loaded; pass prompt_token_ids")
            text, ids = p, self.encode(p)
        elif isinstance(p, dict):
            if "prompt_token_ids" not in p:
                raise ValueError(f"prompt {i} is a dict without 'prompt_token_ids': keys {sorted(p)}")
            text, ids = p.get("prompt"), p["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise TypeError(f"prompt {i}: prompt_token_ids must be a list of int")
        else:
            raise TypeError(f"prompt {i} must be a str or a dict with 'prompt_token_ids', got {type(p).__name__}")
        if len(ids) == 0:
            raise ValueError(f"prompt {i} has no tokens")
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt {i} has {len(ids)} tokens; max_model_len={self.max_model_len} leaves no room to generate"
            )
        return ProcessedPrompt(text, list(ids))

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[ProcessedPrompt]:
        """One conversation (a list of message dicts) or a list of them, through the tokenizer's
        chat template, checked as :meth:`prompt` checks token ids."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, but this engine was built with skip_tokenizer_init=True")
        if not isinstance(messages, list) or not messages:
            raise ValueError(
                f"messages must be a non-empty list of message dicts or of conversations, got {messages!r}"
            )
        convs = [messages] if isinstance(messages[0], dict) else messages
        out = []
        for i, conv in enumerate(convs):
            text = self.render_chat(conv, add_generation_prompt, chat_template, i)
            ids = self.encode(text, add_special_tokens=False)
            out.append(self.prompt({"prompt": text, "prompt_token_ids": ids}, i))
        return out

    def render_chat(
        self,
        conv: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        i: int = 0,
    ) -> str:
        """The prompt text of one conversation (``i``: its position, for the error messages)."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer, but this engine was built with skip_tokenizer_init=True")
        if not isinstance(conv, list) or not conv or not all(isinstance(m, dict) and "role" in m for m in conv):
            raise ValueError(f"conversation {i} must be a non-empty list of {{'role': ..., 'content': ...}} dicts")
        with self.lock:
            return self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
            )
