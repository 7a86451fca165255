"""The proposer interface the engine drives, the no-op one used when speculation is off, and the
registry of speculative-decoding methods (``spec_decode/``), imported by name when one is used so
that the engine imports none of them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .scheduler import Draft, SchedulerOutput
from .sequence import Sequence

if TYPE_CHECKING:
    from ..config import EngineConfig
    from .model_runner import ModelRunner

# speculative_config["method"] -> "module:Class", the class built by ``Class.from_config(config, target)``
PROPOSERS = {
    "ngram": "portable_xy.spec_decode.ngram:NgramProposer",
    "draft_model": "portable_xy.spec_decode.draft_model:DraftModelProposer",
}


class Proposer:
    """Drafts tokens for sequences to verify. A proposer with ``drafts_ahead`` drafts before the
    step is scheduled (from the tokens alone), so the scheduler sizes each verify stage by its
    drafts; otherwise it drafts inside the step, for the verify stages the scheduler reserved, and
    can run a model on the step's blocks. The engine calls :meth:`copy_blocks` with each step's KV
    block copies before the target model runs."""

    drafts_ahead = False

    def propose(self, seqs: list[tuple[Sequence, int]], out: SchedulerOutput | None) -> dict[int, Draft]:
        """``{seq_id: Draft}`` for ``(sequence, k)`` pairs: at most ``k`` drafts each before
        scheduling (``out`` is None), exactly ``k`` inside the step ``out`` (a draft model mirrors
        its prefill chunks)."""
        return {}

    def copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        """Mirror the step's KV block copies ``src -> dst`` in the proposer's own KV cache, if it has one."""


def make_proposer(config: EngineConfig, target: ModelRunner) -> Proposer:
    """The proposer ``config.speculative_config`` asks for (a no-op one without speculation)."""
    spec = config.speculative_config
    if spec is None:
        return Proposer()
    module, cls = PROPOSERS[spec.method].split(":")
    return getattr(importlib.import_module(module), cls).from_config(config, target)
