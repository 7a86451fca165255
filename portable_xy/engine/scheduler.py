"""Token-budget scheduler: each step is ``{sequence: n_tokens}`` under one budget.

Running sequences that need one token (decodes) are served first, then running sequences with a
partial prefill, then waiting sequences in arrival order; a prompt that does not fit the remaining
budget is chunked. When KV blocks run out, the newest running sequence is preempted and later
recomputed. The engine only depends on :meth:`schedule` and :meth:`postprocess`, so a different
policy (the full P/D/V token-wise scheduler) can replace this class.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int, chunk_align: int = 1
    ) -> None:
        self.bm = block_manager
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.chunk_align = chunk_align
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, want: int, room: int) -> int:
        """Tokens to schedule: all of ``want`` if it fits, else ``room`` snapped down to the
        chunk alignment (when that leaves a non-empty chunk)."""
        if want <= room:
            return want
        aligned = room - room % self.chunk_align
        return aligned if aligned > 0 else room

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        room = self.budget
        # Decodes first (one token each), then partial prefills; both in arrival order.
        order = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)
        scheduled: set[int] = set()
        for seq in order:
            if room == 0:
                break
            if seq.status != SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self._chunk(seq.num_uncomputed_tokens, room)
            while not self.bm.can_allocate(seq, n):
                # newest running sequence not yet in this batch (possibly seq itself)
                victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SeqStatus.RUNNING:
                continue
            self.bm.allocate(seq, n)
            batch.add(seq, n)
            scheduled.add(seq.seq_id)
            room -= n
        # Then admit waiting sequences while budget, sequence slots and blocks last.
        while self.waiting and room > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.bm.lookup_prefix(seq)
            self.bm.take_cached(seq, hits)
            n = self._chunk(seq.num_uncomputed_tokens, room)
            if not self.bm.can_allocate(seq, n):
                self.bm.free_seq(seq)  # give the cached blocks back; retry next step
                break
            self.waiting.popleft()
            self.bm.record_lookup(seq.num_tokens, seq.num_computed_tokens)
            self.bm.allocate(seq, n)
            seq.status = SeqStatus.RUNNING
            seq.metrics.num_cached_tokens = max(seq.metrics.num_cached_tokens, seq.num_computed_tokens)
            self.running.append(seq)
            batch.add(seq, n)
            room -= n
        return batch

    def postprocess(self, batch: ScheduledBatch) -> None:
        """Advance computed-token counts after the step ran and publish newly full blocks."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += n
            self.bm.cache_full_blocks(seq)

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
