"""Speculative decoding methods: draft proposers (n-gram prompt lookup, a draft model), each
behind the engine's :class:`~portable_xy.engine.proposer.Proposer` interface and named in its
``PROPOSERS`` registry; the drafts are verified losslessly by the target model
(``engine/rejection.py``) in a Verify stage of the same step as other requests' prefill and
decode tokens."""

from __future__ import annotations

from ..engine.proposer import Proposer, make_proposer
from ..engine.rejection import filtered_probs, verify_drafts
from .config import SpeculativeConfig

__all__ = ["Proposer", "SpeculativeConfig", "filtered_probs", "make_proposer", "verify_drafts"]
