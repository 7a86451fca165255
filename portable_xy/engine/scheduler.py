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
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence

POLICIES = ("tokenwise", "prefill_first", "decode_first")
ORDERS = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # the step's token budget B
    max_num_seqs: int = 256
    policy: str = "tokenwise"
    scheduling_policy: str = "fcfs"  # or "priority": lower ``priority`` first, then arrival
    decode_reserve: int | None = None  # most tokens D/V stages take ahead of prefill (None: all)
    max_num_partial_prefills: int | None = None  # most prefill stages in one step (None: any)
    chunk_align: int = 1
    num_speculative_tokens: int = 0  # most drafts a decoding sequence verifies per step (0: none)
    max_model_len: int | None = None  # longest sequence (None: no limit)

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "chunk_align"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"num_speculative_tokens must be a non-negative int, got {k!r}")
        for name in ("decode_reserve", "max_num_partial_prefills", "max_model_len"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
                raise ValueError(f"{name} must be None or a positive int, got {val!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"scheduler policy {self.policy!r} is not one of {POLICIES}")
        if self.scheduling_policy not in ORDERS:
            raise ValueError(f"scheduling_policy {self.scheduling_policy!r} is not one of {ORDERS}")


@dataclass
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


@dataclass
class ScheduledBatch:
    """One step: its stages, and the KV block copies (``src, dst``) to do before its forward pass
    (copy-on-write prefix reuse)."""

    stages: list[Stage] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)

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


class Scheduler:
    """Fills each step's token budget; see the module docstring."""

    def __init__(self, block_manager: BlockManager, config: SchedulerConfig) -> None:
        self.bm = block_manager
        self.config = config
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

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

    def _chunk(self, want: int, room: int) -> int:
        if want <= room:
            return want
        aligned = room - room % self.config.chunk_align
        return aligned if aligned > 0 else room

    # ---- blocks and preemption ---------------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
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
    def schedule(self) -> ScheduledBatch:
        """The next step's stages (empty when nothing is unfinished). Raises when requests are
        waiting but none fits the KV cache."""
        batch = self._fill_budget()
        if not batch.stages and self.has_unfinished():
            raise RuntimeError("scheduler could not schedule any sequence (KV cache too small?)")
        batch.block_copies = self.bm.take_pending_copies()
        now = time.time()
        for seq in batch.seqs:
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        return batch

    def _fill_budget(self) -> ScheduledBatch:
        cfg = self.config
        batch = ScheduledBatch()
        scheduled: set[int] = set()
        self.running.sort(key=self._key)
        self.waiting.sort(key=self._key)
        room = cfg.max_num_batched_tokens
        decoding = [s for s in self.running if s.in_decode]
        prefill_work = len(decoding) < len(self.running) or bool(self.waiting)
        if cfg.policy == "prefill_first" and prefill_work:
            room = self._schedule_prefills(batch, scheduled, room)
            if batch.stages:
                return batch
        reserve = room if cfg.decode_reserve is None else min(room, cfg.decode_reserve)
        left = self._schedule_decodes(batch, scheduled, decoding, reserve)
        room -= reserve - left
        if cfg.policy != "decode_first" or not decoding:
            room = self._schedule_prefills(batch, scheduled, room)
        self._schedule_decodes(batch, scheduled, [s for s in decoding if s.seq_id not in scheduled], room)
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch, scheduled: set[int], seqs: list[Sequence], room: int) -> int:
        """Decode / verify stages for ``seqs`` while ``room`` lasts; returns the room left."""
        for seq in seqs:
            if room == 0:
                break
            if seq.status != SeqStatus.RUNNING or seq.seq_id in scheduled:
                continue  # preempted earlier in this step
            k = min(self.num_spec_tokens(seq), room - 1)
            if k > 0 and not self.bm.can_allocate(seq, 1 + k):
                k = 0  # short of blocks: verify nothing rather than preempt someone
            if not self._allocate(seq, 1 + k, scheduled):
                continue
            batch.stages.append(Stage(seq, "V" if k else "D", seq.num_computed_tokens, 1 + k))
            scheduled.add(seq.seq_id)
            room -= 1 + k
        return room

    def _schedule_prefills(self, batch: ScheduledBatch, scheduled: set[int], room: int) -> int:
        """Prefill chunks: running partial prefills first, then waiting prompts admitted in order
        while room, sequence slots and blocks last. Returns the room left."""
        cap = self.config.max_num_partial_prefills
        count = sum(st.kind == "P" for st in batch.stages)
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
            batch.stages.append(Stage(seq, "P", seq.num_computed_tokens, n))
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
            copied = self.bm.take_cached(seq, *self.bm.lookup_prefix(seq)) if lookup else 0
            n = self._chunk(seq.num_uncomputed_tokens, room)
            if not self.bm.can_allocate(seq, n):
                self.bm.free_seq(seq)  # give the cached blocks back; retry next step
                break
            self.waiting.pop(0)
            if lookup:
                self.bm.record_lookup(seq.num_tokens, seq.num_computed_tokens, copied)
            self.bm.allocate(seq, n)
            seq.status = SeqStatus.RUNNING
            seq.metrics.num_cached_tokens = max(seq.metrics.num_cached_tokens, seq.num_computed_tokens)
            self.running.append(seq)
            batch.stages.append(Stage(seq, "P", seq.num_computed_tokens, n))
            scheduled.add(seq.seq_id)
            room -= n
            count += 1
        return room

    def postprocess(self, batch: ScheduledBatch, num_rejected: dict[int, int] | None = None) -> None:
        """Advance computed-token counts after the step ran (a verify stage keeps only its
        accepted drafts) and publish the newly computed blocks."""
        for st in batch.stages:
            seq = st.seq
            seq.num_computed_tokens += st.num_tokens - (num_rejected or {}).get(seq.seq_id, 0)
            self.bm.publish(seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = SeqStatus.FINISHED
        self.running.remove(seq)
        self.bm.free_seq(seq)

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            self.bm.free_seq(seq)
        seq.status = SeqStatus.FINISHED
