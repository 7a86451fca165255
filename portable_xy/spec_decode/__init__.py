"""Speculative decoding: draft proposers (n-gram prompt lookup, a draft model) behind one
interface (:class:`Proposer`), and lossless verification of the drafts by the target model (a
Verify stage in the same step as other requests' prefill and decode tokens)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import SpeculativeConfig
from .proposer import Proposer
from .rejection import filtered_probs, verify_drafts

if TYPE_CHECKING:
    from ..config import EngineConfig
    from ..engine.model_runner import ModelRunner


def make_proposer(config: EngineConfig, target: ModelRunner) -> Proposer:
    """The proposer ``config.speculative_config`` asks for (a no-op one without speculation)."""
    spec = config.speculative_config
    if spec is None:
        return Proposer()
    if spec.method == "ngram":
        from .ngram import NgramProposer

        return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    from .draft_model import DraftModelProposer

    return DraftModelProposer(config, target)


__all__ = ["Proposer", "SpeculativeConfig", "filtered_probs", "make_proposer", "verify_drafts"]
