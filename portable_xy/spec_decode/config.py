"""``LLM(speculative_config={...})``: parsed and validated up front (vLLM's keys)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("ngram", "draft_model")
_KEYS = {
    "ngram": {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"},
    "draft_model": {"method", "model", "num_speculative_tokens"},
}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> SpeculativeConfig | None:
        if cfg is None:
            return None
        if not isinstance(cfg, dict):
            raise TypeError(f"speculative_config must be a dict, got {type(cfg).__name__}")
        method = cfg.get("method")
        if method is None and "model" in cfg:
            method = "ngram" if cfg["model"] in ("ngram", "[ngram]") else "draft_model"
        if method not in METHODS:
            raise ValueError(f"speculative_config['method']={method!r} is not one of {METHODS}")
        unknown = sorted(set(cfg) - _KEYS[method] - ({"model"} if method == "ngram" else set()))
        if unknown:
            raise ValueError(f"speculative_config got unknown key(s) {unknown} for method {method!r}")
        k = cfg.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64:
            raise ValueError(f"speculative_config['num_speculative_tokens'] must be an int in [1, 64], got {k!r}")
        if method == "ngram":
            lo, hi = cfg.get("prompt_lookup_min", 1), cfg.get("prompt_lookup_max", 4)
            for name, val in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                    raise ValueError(f"speculative_config['{name}'] must be a positive int, got {val!r}")
            if lo > hi:
                raise ValueError(f"speculative_config: prompt_lookup_min={lo} > prompt_lookup_max={hi}")
            return cls(method, k, lo, hi)
        model = cfg.get("model")
        if not isinstance(model, (str, Path)):
            raise ValueError(f"speculative_config['model'] must be a model path, got {model!r}")
        return cls(method, k, model=str(model))
