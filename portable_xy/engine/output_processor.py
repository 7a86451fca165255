"""After a step: append each sequence's new tokens, check its stop conditions, detokenize, and
build the vLLM-shaped outputs of finished requests."""

from __future__ import annotations

from ..outputs import CompletionOutput, Logprob, RequestOutput
from .sampler import SampleResult
from .sequence import Request, Sequence


class OutputProcessor:
    """Stop checks and detokenization with the engine's tokenizer (``None``: token ids only)."""

    def __init__(self, tokenizer, eos_ids: list[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len

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

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _decode(self, seq: Sequence, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
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

    def make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            if not isinstance(seq.stop_reason, str):  # stop-string text was cut in _check_stop
                ids = seq.output_token_ids
                if seq.finish_reason == "stop" and not seq.params.include_stop_str_in_output:
                    ids = ids[:-1]  # EOS or a stop token id: not part of the text
                seq.text = self._decode(seq, ids)
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.text,
                    token_ids=seq.output_token_ids,
                    cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                    logprobs=seq.logprobs if seq.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=True,
            metrics=req.metrics,
            num_cached_tokens=req.metrics.num_cached_tokens,
        )
