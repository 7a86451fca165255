"""Speculative decoding: draft proposers (n-gram prompt lookup, a draft model) and lossless
verification of the drafts by the target model (a Verify stage in the same step as other
requests' prefill and decode tokens)."""

from .config import SpeculativeConfig
from .rejection import filtered_probs, verify_drafts

__all__ = ["SpeculativeConfig", "filtered_probs", "verify_drafts"]
