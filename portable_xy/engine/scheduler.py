"""Token-wise hybrid Prefill/Decode/Verify scheduler (XY-Serve §4.1, vLLM V1's contract).

There are no prefill or decode phases. A sequence has tokens computed (in the KV cache) and tokens
wanted (the rest of its prompt and outputs, plus draft tokens when it speculates); each step gives
sequences tokens under one budget ``B`` and emits the step's token table: one :class:`Stage` per
sequence (kind P, D or V, history length, token count), which drives the attention task table and
the GEMM tile plan.

Policies (``SchedulerConfig.policy``):

* ``tokenwise`` (default): decode (1 token) and verify (1 + drafts) stages take their reserved room
  first (at most ``decode_reserve`` tokens; default all they need), prefill chunks from any number
  of prompts take the rest, then leftover room goes to decode/verify stages that did not fit the
  reserve. A prefill-only step happens only when nothing decodes or verifies, so nothing starves.
* ``prefill_first`` (vLLM v0 / nano-vllm style): a step with any prefill work that fits the free KV
  blocks is prefill-only; prefills never preempt (else, with the cache full, prefill chunks could
  preempt each other forever while the decodes holding the blocks never run).
* ``decode_first``: prefill runs only in steps where nothing decodes or verifies.

A prompt longer than the room left is chunked; a cut chunk is snapped down to ``chunk_align``
(the profile's attention tile) when that leaves a non-empty chunk -- the cut tokens just run in the
next step. When KV blocks run out, the lowest-priority newest running sequence is preempted and
later recomputed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..scheduler_config import SchedulerConfig
from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class Draft:
    """Draft tokens for one sequence, and the proposer's distributions ``[k, V]`` they were drawn
    from (``None``: a deterministic proposal, one-hot)."""

    token_ids: list[int]
    probs: Any = None


@dataclass(frozen=True)
class Stage:
    """One sequence's segment of the step: ``num_tokens`` tokens at positions ``start...``
    (``start`` = its history length, the tokens already in the KV cache)."""

    seq: Sequence
    kind: str  # "P" prefill chunk, "D" decode, "V" verify (last token + drafts)
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The stage reaches its sequence's last token, so its last logit row samples (a verify
        stage verifies and samples)."""
        return self.kind == "V" or self.start + self.num_tokens >= self.seq.num_tokens

    @property
    def prompt_logprob_positions(self) -> range:
        """Positions of this prefill chunk whose logits give prompt logprobs: position ``i`` scores
        prompt token ``i + 1``. Empty unless the sequence still misses some (``prompt_logprobs``);
        those already collected (before a preemption) are not asked for again."""
        seq = self.seq
        if self.kind != "P" or not seq.prompt_logprobs_pending:
            return range(0)
        first = max(self.start, len(seq.prompt_logprobs) - 1)
        return range(first, max(first, min(self.start + self.num_tokens, seq.num_prompt_tokens - 1)))

    @property
    def num_logits(self) -> int:
        """Logit rows the step returns for this stage, the stage's last ones: every row of a
        verify stage; for a chunk with prompt-logprob positions, those and the rows after them to
        the chunk's end (the last one samples if the chunk ends the prompt); else one when the
        stage samples, else none."""
        if self.kind == "V":
            return self.num_tokens
        plp = self.prompt_logprob_positions
        if plp:
            return self.start + self.num_tokens - plp.start
        return int(self.samples)


@dataclass(frozen=True)
class SchedulerOutput:
    """One step, as :meth:`Scheduler.schedule` decided it (immutable): its stages (at most one per
    sequence), the KV block copies (``src, dst``) to do before its forward pass (copy-on-write
    prefix reuse), and the sequences preempted or finished since the previous step (a proposer
    with state of its own drops theirs)."""

    stages: tuple[Stage, ...] = ()
    block_copies: tuple[tuple[int, int], ...] = ()
    preempted_seq_ids: frozenset[int] = frozenset()
    finished_seq_ids: frozenset[int] = frozenset()

    @property
    def num_scheduled_tokens(self) -> Mapping[int, int]:
        """``{seq_id: tokens}`` under the budget."""
        return MappingProxyType({st.seq.seq_id: st.num_tokens for st in self.stages})

    @property
    def num_spec_tokens(self) -> Mapping[int, int]:
        """``{seq_id: draft tokens verified}`` of the verify stages."""
        return MappingProxyType({st.seq.seq_id: st.num_tokens - 1 for st in self.stages if st.kind == "V"})

    @property
    def seqs(self) -> list[Sequence]:
        return [st.seq for st in self.stages]

    @property
    def num_tokens(self) -> list[int]:
        return [st.num_tokens for st in self.stages]

    @property
    def verify_stages(self) -> list[Stage]:
        return [st for st in self.stages if st.kind == "V"]

    @property
    def total_tokens(self) -> int:
        return sum(st.num_tokens for st in self.stages)

    def count(self, kind: str) -> int:
        return sum(st.num_tokens for st in self.stages if st.kind == kind)

    def __len__(self) -> int:
        return len(self.stages)


@dataclass(frozen=True)
class SchedulerStats:
    """The scheduler's state for metrics: requests running and waiting, KV cache use, counters."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    prefix_cache_copied_tokens: int


class Scheduler:
    """Fills each step's token budget; see the module docstring. The scheduling state of a
    sequence (its status, computed-token count, block table, drafts and preemptions) is written
    here and in the block manager only."""

    def __init__(self, block_manager: BlockManager, config: SchedulerConfig) -> None:
        self.bm = block_manager
        self.config = config
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._preempted: set[int] = set()  # since the last schedule()
        self._finished: set[int] = set()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        bm = self.bm
        return SchedulerStats(
            num_running=len({s.request_id for s in self.running}),
            num_waiting=len({s.request_id for s in self.waiting} - {s.request_id for s in self.running}),
            kv_cache_usage=1.0 - bm.num_free_blocks / len(bm.blocks),
            num_preemptions=self.num_preemptions,
            prefix_cache_queried_tokens=bm.num_queried_tokens,
            prefix_cache_hit_tokens=bm.num_hit_tokens,
            prefix_cache_copied_tokens=bm.num_copied_tokens,
        )

    def _key(self, seq: Sequence) -> tuple[int, int]:
        return (seq.priority if self.config.scheduling_policy == "priority" else 0, seq.seq_id)

    def num_spec_tokens(self, seq: Sequence) -> int:
        """How many drafts ``seq`` may verify next step: 0 when not speculating or when its
        sampling needs per-token state (penalties, min_tokens, logprobs); never more than the
        tokens it may still emit minus the one the target adds."""
        k = self.config.num_speculative_tokens
        p = seq.params
        if not k or not p.can_speculate or seq.num_output_tokens < p.min_tokens:
            return 0
        left = seq.num_tokens_left(self.config.max_model_len)
        return max(0, min(k, left - 1))

    def spec_candidates(self) -> list[tuple[Sequence, int]]:
        """``(sequence, most drafts)`` of the running sequences that may verify drafts next step:
        what a proposer that drafts before scheduling is asked for."""
        out = []
        for seq in self.running:
            k = self.num_spec_tokens(seq) if seq.in_decode else 0
            if k:
                out.append((seq, k))
        return out

    def _chunk(self, want: int, room: int) -> int:
        if want <= room:
            return want
        aligned = room - room % self.config.chunk_align
        return aligned if aligned > 0 else room

    # ---- blocks and preemption ---------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        """Give back ``seq``'s blocks; nothing of it is computed any more."""
        self.bm.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.draft_token_ids, seq.draft_probs = [], None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted.add(seq.seq_id)
        self.waiting.append(seq)

    def _allocate(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        """Blocks for ``n`` more tokens of running ``seq``, preempting the lowest-priority newest
        running sequences not yet in this step. False if ``seq`` itself was preempted."""
        while not self.bm.can_allocate(seq, n):
            victim = max((s for s in self.running if s.seq_id not in scheduled), key=self._key)
            self._preempt(victim)
            if victim is seq:
                return False
        self.bm.allocate(seq, n)
        return True

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self, drafts: Mapping[int, Draft] | None = None) -> SchedulerOutput:
        """The next step (no stages when nothing is unfinished). ``drafts``: what a proposer
        drafted before this step (:meth:`spec_candidates`); a verify stage then verifies those
        (fewer when room or blocks run short). Without it, a verify stage reserves room for
        :meth:`num_spec_tokens` drafts that :meth:`update_draft_token_ids` fills before the step
        runs. Raises when requests are waiting but none fits the KV cache."""
        stages = self._fill_budget(drafts)
        if not stages and self.has_unfinished():
            raise RuntimeError("scheduler could not schedule any sequence (KV cache too small?)")
        out = SchedulerOutput(tuple(stages), tuple(self.bm.take_pending_copies()), frozenset(self._preempted),
                              frozenset(self._finished))  # fmt: skip
        self._preempted.clear()
        self._finished.clear()
        now = time.time()
        for seq in out.seqs:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        return out

    def _fill_budget(self, drafts: Mapping[int, Draft] | None) -> list[Stage]:
        cfg = self.config
        stages: list[Stage] = []
        scheduled: set[int] = set()
        self.running.sort(key=self._key)
        self.waiting.sort(key=self._key)
        room = cfg.max_num_batched_tokens
        decoding = [s for s in self.running if s.in_decode]
        prefill_work = len(decoding) < len(self.running) or bool(self.waiting)
        if cfg.policy == "prefill_first" and prefill_work:
            room = self._schedule_prefills(stages, scheduled, room)
            if stages:
                return stages
        reserve = room if cfg.decode_reserve is None else min(room, cfg.decode_reserve)
        left = self._schedule_decodes(stages, scheduled, decoding, reserve, drafts)
        room -= reserve - left
        if cfg.policy != "decode_first" or not decoding:
            room = self._schedule_prefills(stages, scheduled, room)
        rest = [s for s in decoding if s.seq_id not in scheduled]
        self._schedule_decodes(stages, scheduled, rest, room, drafts)
        return stages

    def _schedule_decodes(
        self,
        stages: list[Stage],
        scheduled: set[int],
        seqs: list[Sequence],
        room: int,
        drafts: Mapping[int, Draft] | None,
    ) -> int:
        """Decode / verify stages for ``seqs`` while ``room`` lasts; returns the room left."""
        for seq in seqs:
            if room == 0:
                break
            if seq.status != SeqStatus.RUNNING or seq.seq_id in scheduled:
                continue  # preempted earlier in this step
            k = min(self.num_spec_tokens(seq), room - 1)
            draft = None if drafts is None else drafts.get(seq.seq_id)
            if drafts is not None:
                k = min(k, len(draft.token_ids) if draft else 0)
            if k > 0 and not self.bm.can_allocate(seq, 1 + k):
                k = 0  # short of blocks: verify nothing rather than preempt someone
            if not self._allocate(seq, 1 + k, scheduled):
                continue
            if draft is not None and k:
                seq.draft_token_ids = draft.token_ids[:k]
                seq.draft_probs = None if draft.probs is None else draft.probs[:k]
            stages.append(Stage(seq, "V" if k else "D", seq.num_computed_tokens, 1 + k))
            scheduled.add(seq.seq_id)
            room -= 1 + k
        return room

    def _schedule_prefills(self, stages: list[Stage], scheduled: set[int], room: int) -> int:
        """Prefill chunks: running partial prefills first, then waiting prompts admitted in order
        while room, sequence slots and blocks last. Returns the room left."""
        cap = self.config.max_num_partial_prefills
        count = sum(st.kind == "P" for st in stages)
        for seq in [s for s in self.running if not s.in_decode]:
            if room == 0 or (cap is not None and count >= cap):
                return room
            if seq.status != SeqStatus.RUNNING or seq.seq_id in scheduled:
                continue
            n = self._chunk(seq.num_uncomputed_tokens, room)
            if self.config.policy == "prefill_first" and not self.bm.can_allocate(seq, n):
                continue  # prefill-first prefills never preempt: that could starve the decodes forever
            if not self._allocate(seq, n, scheduled):
                continue
            stages.append(Stage(seq, "P", seq.num_computed_tokens, n))
            scheduled.add(seq.seq_id)
            room -= n
            count += 1
        while self.waiting and room > 0 and len(self.running) < self.config.max_num_seqs:
            if cap is not None and count >= cap:
                break
            seq = self.waiting[0]
            # vLLM: a sequence still collecting prompt logprobs computes its whole prompt, so it
            # skips the prefix-cache lookup (its computed blocks are still published for others)
            lookup = not seq.prompt_logprobs_pending
            cached, copied = self.bm.take_cached(seq, *self.bm.lookup_prefix(seq)) if lookup else (0, 0)
            seq.num_computed_tokens = cached
            n = self._chunk(seq.num_uncomputed_tokens, room)
            if not self.bm.can_allocate(seq, n):
                self._release(seq)  # give the cached blocks back; retry next step
                break
            self.waiting.pop(0)
            if lookup:
                self.bm.record_lookup(seq.num_tokens, seq.num_computed_tokens, copied)
            self.bm.allocate(seq, n)
            seq.status = SeqStatus.RUNNING
            seq.metrics.num_cached_tokens = max(seq.metrics.num_cached_tokens, seq.num_computed_tokens)
            self.running.append(seq)
            stages.append(Stage(seq, "P", seq.num_computed_tokens, n))
            scheduled.add(seq.seq_id)
            room -= n
            count += 1
        return room

    # ---- after the step ----------------------------------------------------------------------
    def update_draft_token_ids(self, out: SchedulerOutput, drafts: Mapping[int, Draft]) -> None:
        """The drafts a proposer made inside the step for its verify stages (exactly the room each
        stage reserved)."""
        for st in out.verify_stages:
            d = drafts.get(st.seq.seq_id)
            if d is None or len(d.token_ids) != st.num_tokens - 1:
                got = 0 if d is None else len(d.token_ids)
                raise RuntimeError(f"the proposer gave {got} drafts for a verify stage of {st.num_tokens - 1}")
            st.seq.draft_token_ids, st.seq.draft_probs = list(d.token_ids), d.probs

    def update_from_output(self, out: SchedulerOutput, num_emitted: Mapping[int, int]) -> dict[int, int]:
        """After the step ran: ``num_emitted`` is ``{seq_id: tokens the step emitted}`` (for a
        verify stage its accepted drafts plus the target's token). Advances computed-token counts
        (rejected drafts are rolled back), publishes the newly computed blocks and drops the
        drafts. Returns ``{seq_id: drafts accepted}`` of the verify stages."""
        accepted = {st.seq.seq_id: num_emitted.get(st.seq.seq_id, 1) - 1 for st in out.verify_stages}
        self.postprocess(out, {sid: out.num_spec_tokens[sid] - a for sid, a in accepted.items()})
        for seq in out.seqs:
            seq.draft_token_ids, seq.draft_probs = [], None
        return accepted

    def postprocess(self, out: SchedulerOutput, num_rejected: Mapping[int, int] | None = None) -> None:
        """Advance computed-token counts after the step ran (a verify stage keeps only its
        accepted drafts) and publish the newly computed blocks."""
        for st in out.stages:
            seq = st.seq
            seq.num_computed_tokens += st.num_tokens - (num_rejected or {}).get(seq.seq_id, 0)
            self.bm.publish(seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = SeqStatus.FINISHED
        self.running.remove(seq)
        self._release(seq)
        self._finished.add(seq.seq_id)

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        seq.status = SeqStatus.FINISHED
        self._finished.add(seq.seq_id)
