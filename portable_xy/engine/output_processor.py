"""After a step: append each sequence's new tokens, check its stop conditions, detokenize, and
build the vLLM-shaped outputs: one when a request finishes, and while it runs one per step that
gave it tokens, everything so far or only what is new (``SamplingParams.output_kind``)."""

from __future__ import annotations

import contextlib
import threading

from ..outputs import CompletionOutput, Logprob, RequestOutput
from ..sampling_params import RequestOutputKind
from .sampler import SampleResult
from .sequence import Request, Sequence


class OutputProcessor:
    """Stop checks and detokenization with the engine's tokenizer (``None``: token ids only)."""

    def __init__(self, tokenizer, eos_ids: list[int], max_model_len: int, lock: threading.Lock | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.lock = lock or contextlib.nullcontext()
        self._token_text: dict[int, str] = {}  # decode([id]) of the tokens logprobs returned so far

    def append(self, seq: Sequence, results: list[SampleResult], now: float) -> int:
        """Append ``results`` to ``seq`` until one finishes it; returns how many were appended."""
        n = 0
        for res in results:
            seq.token_ids.append(res.token_id)
            n += 1
            m = seq.metrics
            if seq.index == 0:
                m.first_token_time = m.first_token_time or now
                m.last_token_time = now
                m.num_generated_tokens = seq.num_output_tokens
            if seq.params.logprobs is not None:
                seq.cumulative_logprob += res.logprob
                seq.logprobs.append({t: Logprob(lp, rank, self._decode_one(t)) for t, lp, rank in res.top})
            self._check_stop(seq)
            if seq.finish_reason is not None:
                break
        return n

    def append_prompt_logprobs(self, seq: Sequence, first: int, rows: list[list[tuple[int, float, int]]]) -> None:
        """Add a prefill chunk's prompt logprobs, for prompt positions ``first...`` (rows as
        :func:`~portable_xy.engine.sampler.prompt_logprobs` gives them)."""
        assert first == len(seq.prompt_logprobs), f"prompt logprobs for {first}, have {len(seq.prompt_logprobs)}"
        for top in rows:
            texts = self._decode_each([t for t, _, _ in top])
            seq.prompt_logprobs.append({t: Logprob(lp, rank, s) for (t, lp, rank), s in zip(top, texts)})

    def _decode_one(self, token_id: int) -> str | None:
        return self._decode_each([token_id])[0]

    def _decode_each(self, token_ids: list[int]) -> list[str | None]:
        """Each token decoded on its own (as logprobs' ``decoded_token``), cached by id."""
        if self.tokenizer is None:
            return [None] * len(token_ids)
        cache = self._token_text
        missing = [t for t in dict.fromkeys(token_ids) if t not in cache]
        if missing:
            with self.lock:
                for t in missing:
                    cache[t] = self.tokenizer.decode([t])
        return [cache[t] for t in token_ids]

    def _decode(self, seq: Sequence, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        with self.lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=seq.params.skip_special_tokens)

    def _check_stop(self, seq: Sequence) -> None:
        p = seq.params
        tok = seq.token_ids[-1]
        if not p.ignore_eos and tok in self.eos_ids:
            seq.finish_reason = "stop"
        elif tok in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
        elif p.stop_strings and self.tokenizer is not None:
            prev = len(seq.text)
            seq.text = self._decode(seq, seq.output_token_ids)
            for stop in p.stop_strings:
                at = seq.text.find(stop, max(0, prev - len(stop) + 1))
                if at >= 0:
                    seq.text = seq.text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    return
        if seq.finish_reason is None and (
            (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or seq.num_tokens >= self.max_model_len
        ):
            seq.finish_reason = "length"

    def final_text(self, seq: Sequence) -> str:
        """A finished sequence's text: without its EOS / stop token, cut at a stop string."""
        if not isinstance(seq.stop_reason, str):  # stop-string text was cut in _check_stop
            ids = seq.output_token_ids
            if seq.finish_reason == "stop" and not seq.params.include_stop_str_in_output:
                ids = ids[:-1]  # EOS or a stop token id: not part of the text
            seq.text = self._decode(seq, ids)
        return seq.text

    def _stable_text(self, seq: Sequence) -> str:
        """A running sequence's text as far as it cannot change any more, holding back what could
        be the start of a stop string. Decoded incrementally: each step decodes a window of a few
        tokens before and after the last complete character (so a word boundary or a multi-byte
        character across tokens decodes as in the full text), not the whole output."""
        ids = seq.output_token_ids
        if seq.read_offset < len(ids):
            prefix = self._decode(seq, ids[seq.prefix_offset : seq.read_offset])
            new = self._decode(seq, ids[seq.prefix_offset :])
            if len(new) > len(prefix) and not new.endswith("\ufffd"):
                seq.stream_text += new[len(prefix) :]
                seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        text = seq.stream_text
        hold = max((len(s) for s in seq.params.stop_strings), default=1) - 1
        text = text[: len(text) - hold] if hold else text
        return text if len(text) >= len(seq.sent_text) else seq.sent_text

    def make_output(self, req: Request) -> RequestOutput | None:
        """The request's output now (None: nothing new to return for a ``DELTA`` request)."""
        delta = req.params.output_kind == RequestOutputKind.DELTA
        outs = []
        for seq in req.seqs:
            done = seq.finish_reason is not None
            if delta and (seq.finish_sent or (not done and seq.num_sent_tokens == seq.num_output_tokens)):
                continue
            text = self.final_text(seq) if done else self._stable_text(seq)
            start = seq.num_sent_tokens if delta else 0
            logprobs = seq.logprobs[start:] if seq.params.logprobs is not None else None
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text[len(seq.sent_text) :] if delta else text,
                    token_ids=seq.output_token_ids[start:],
                    cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                    logprobs=logprobs,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
            seq.num_sent_tokens, seq.sent_text, seq.finish_sent = seq.num_output_tokens, text, done
        if not outs:
            return None
        prompt_lps = req.seqs[0].prompt_logprobs
        if prompt_lps is not None:  # DELTA: all of them in the first output, then [] (as vLLM)
            prompt_lps = [] if delta and req.prompt_logprobs_sent else list(prompt_lps)
            req.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=req.finished,
            metrics=req.metrics,
            prompt_logprobs=prompt_lps,
            num_cached_tokens=req.metrics.num_cached_tokens,
        )
