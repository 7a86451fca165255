"""Scheduler + block manager properties under random workloads (hypothesis), with a fake model
that writes token ids into a fake paged KV cache: every stage must read exactly its sequence's
earlier tokens from the cache (so prefix reuse and copy-on-write are checked for content, not
just counts), the budget holds, blocks never leak and every request ends with its length."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portable_xy.engine.block_manager import BlockManager, chain_hash
from portable_xy.engine.scheduler import Scheduler, SchedulerConfig
from portable_xy.engine.sequence import Sequence
from portable_xy.outputs import RequestMetrics
from portable_xy.sampling_params import SamplingParams

BS = 4  # tiny blocks: many partial-block matches


class FakeEngine:
    """Drives a Scheduler like LLMEngine does, with a fake forward pass over a fake KV cache."""

    def __init__(self, cfg: SchedulerConfig, num_blocks: int, caching: bool, token_wise: bool, spec_k: int, seed: int):
        self.bm = BlockManager(num_blocks, BS, caching, token_wise)
        self.sched = Scheduler(self.bm, dataclasses.replace(cfg, num_speculative_tokens=spec_k))
        self.kv = [-1] * (num_blocks * BS)  # token id stored at each slot
        self.rng = random.Random(seed)
        self.want: dict[int, int] = {}  # seq id -> output length
        self.done: dict[int, Sequence] = {}
        self.next_id = 0

    def add(self, prompt: list[int], out_len: int, priority: int = 0) -> Sequence:
        params = SamplingParams(temperature=0, max_tokens=out_len)  # the scheduler verifies < out_len drafts
        seq = Sequence(self.next_id, str(self.next_id), 0, prompt, params, None, RequestMetrics(0.0), priority)
        self.want[seq.seq_id] = out_len
        self.next_id += 1
        self.sched.add(seq)
        return seq

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // BS] * BS + pos % BS

    def step(self):
        cfg = self.sched.config
        batch = self.sched.schedule()
        assert batch.total_tokens <= cfg.max_num_batched_tokens
        assert len({s.seq.seq_id for s in batch.stages}) == len(batch.stages)
        for src, dst in batch.block_copies:
            self.kv[dst * BS : (dst + 1) * BS] = self.kv[src * BS : (src + 1) * BS]
        new: dict[int, list[int]] = {}
        rejected: dict[int, int] = {}
        for stage in batch.stages:
            seq = stage.seq
            assert stage.num_tokens >= 1 and stage.start == seq.num_computed_tokens
            assert len(seq.block_table) * BS >= stage.start + stage.num_tokens
            # the K/V this stage attends to: every earlier token of its own sequence
            assert [self.kv[self.slot(seq, p)] for p in range(stage.start)] == seq.token_ids[: stage.start]
            toks = seq.token_ids[stage.start : stage.start + stage.num_tokens]
            if stage.kind == "V":
                drafts = [self.rng.randrange(50) for _ in range(stage.num_tokens - 1)]
                toks = toks + drafts
                a = self.rng.randrange(len(drafts) + 1)
                new[seq.seq_id] = drafts[:a] + [self.rng.randrange(50)]
                rejected[seq.seq_id] = len(drafts) - a
            elif stage.start + stage.num_tokens == seq.num_tokens:
                new[seq.seq_id] = [self.rng.randrange(50)]
            assert stage.kind != "D" or stage.num_tokens == 1
            for p, t in enumerate(toks, stage.start):
                self.kv[self.slot(seq, p)] = t
        self.sched.postprocess(batch, rejected)
        for stage in batch.stages:
            seq = stage.seq
            for t in new.get(seq.seq_id, ()):
                if seq.num_output_tokens < self.want[seq.seq_id]:
                    seq.token_ids.append(t)
            if seq.num_output_tokens >= self.want[seq.seq_id]:
                self.sched.finish(seq)
                self.done[seq.seq_id] = seq
        self.check_blocks()
        return batch

    def check_blocks(self):
        refs = [0] * len(self.bm.blocks)
        for seq in self.sched.running:
            for b in seq.block_table:
                refs[b] += 1
        for block in self.bm.blocks:
            assert block.ref_count == refs[block.block_id]
            assert (block.block_id in self.bm.free) == (block.ref_count == 0)
            n = len(block.token_ids)
            assert self.kv[block.block_id * BS : block.block_id * BS + n] == list(block.token_ids)
            if block.hash is not None:
                assert n == BS and block.hash == chain_hash(block.parent, block.token_ids)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    budget=st.sampled_from([1, 3, 8, 16, 64]),
    policy=st.sampled_from(["tokenwise", "prefill_first", "decode_first"]),
    order=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
    token_wise=st.booleans(),
    spec_k=st.sampled_from([0, 0, 2, 5]),
    num_blocks=st.integers(12, 40),
    seed=st.integers(0, 10**6),
)
def test_random_workloads(data, budget, policy, order, caching, token_wise, spec_k, num_blocks, seed):
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=6, policy=policy, scheduling_policy=order,
        chunk_align=data.draw(st.sampled_from([1, 4])),
        max_num_partial_prefills=data.draw(st.sampled_from([None, 1, 2])),
    )  # fmt: skip
    eng = FakeEngine(cfg, num_blocks, caching, token_wise, spec_k, seed)
    rng = random.Random(seed)
    base = [rng.randrange(3) for _ in range(30)]  # shared prefixes of random lengths
    arrivals = data.draw(st.lists(st.integers(0, 30), min_size=1, max_size=10))
    reqs = []
    for at in sorted(arrivals):
        cut = rng.randrange(len(base))
        prompt = base[:cut] + [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
        prompt = prompt[: num_blocks * BS // 2]
        reqs.append((at, prompt, rng.randrange(1, 10), rng.randrange(3)))
    aborts = set(data.draw(st.lists(st.integers(0, len(reqs) - 1), max_size=2)))
    seqs: dict[int, Sequence] = {}
    step = 0
    while len(seqs) < len(reqs) or eng.sched.has_unfinished():
        for i, (at, prompt, out_len, prio) in enumerate(reqs):
            if at == step:
                seqs[i] = eng.add(prompt, out_len, prio)
        if eng.sched.has_unfinished():
            eng.step()
        for i in aborts:
            if i in seqs and step == reqs[i][0] + 3 and not seqs[i].is_finished:
                eng.sched.abort(seqs[i])
                eng.check_blocks()
        step += 1
        assert step < 2000, "no progress"
    for i, (_, prompt, out_len, _) in enumerate(reqs):
        seq = seqs[i]
        assert seq.token_ids[: len(prompt)] == prompt
        if i not in aborts or seq.seq_id in eng.done:
            assert seq.num_output_tokens == out_len
    assert eng.bm.num_free_blocks == num_blocks  # nothing leaked
    assert all(b.ref_count == 0 for b in eng.bm.blocks)


@pytest.mark.parametrize("policy", ["tokenwise", "prefill_first"])
def test_long_prompts_do_not_stall_decodes(policy):
    """A stream of long prompts: under the token-wise policy every running decode gets a token in
    every step; prefill-first stalls them (which shows the check can fail)."""
    cfg = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=64, policy=policy)
    eng = FakeEngine(cfg, num_blocks=4000, caching=False, token_wise=False, spec_k=0, seed=0)
    decoders = [eng.add([7, 8, 9], 1000) for _ in range(4)]
    for _ in range(3):
        eng.step()
    stalled = 0
    for i in range(40):
        eng.add([i % 5] * 300, 1)  # 300-token prompt: 5 steps of prefill each
        before = [d.num_output_tokens for d in decoders]
        batch = eng.step()
        assert batch.total_tokens == 64
        stalled += sum(d.num_output_tokens == b for d, b in zip(decoders, before))
    if policy == "tokenwise":
        assert stalled == 0
    else:
        assert stalled > 0


def test_decode_reserve_caps_decode_tokens_until_prefill_is_served():
    cfg = SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=64, decode_reserve=4)
    eng = FakeEngine(cfg, num_blocks=400, caching=False, token_wise=False, spec_k=0, seed=0)
    for _ in range(10):
        eng.add([1, 2], 50)
    for _ in range(3):
        eng.step()  # all ten decoding now
    eng.add([3] * 100, 1)
    batch = eng.step()
    kinds = [s.kind for s in batch.stages]
    # 4 reserved decode tokens, then 12 prefill tokens; no room left for the other decodes
    assert kinds[:4] == ["D"] * 4 and batch.count("P") == 12 and batch.count("D") == 4


def test_priority_order_and_preemption_victim():
    cfg = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, scheduling_policy="priority")
    eng = FakeEngine(cfg, num_blocks=6, caching=False, token_wise=False, spec_k=0, seed=0)
    low = eng.add([1] * 8, 10, priority=5)  # 18 tokens = 5 blocks each; 6 blocks hold only one
    high = eng.add([2] * 8, 10, priority=0)
    batch = eng.step()
    assert [s.seq for s in batch.stages] == [high, low]
    while not high.is_finished:
        eng.step()
        assert high.status.name != "WAITING"  # only the low-priority sequence is ever preempted
    assert low.num_preemptions > 0


def test_token_table_kinds_and_history():
    cfg = SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=8)
    eng = FakeEngine(cfg, num_blocks=100, caching=False, token_wise=False, spec_k=3, seed=1)
    a = eng.add([1] * 6, 20)
    eng.step()  # a: prefill 6
    b = eng.add([2] * 30, 5)
    batch = eng.step()  # a verifies (1 + 3 drafts), b prefills the remaining 6 budget tokens
    table = [(s.seq, s.kind, s.start, s.num_tokens) for s in batch.stages]
    assert table == [(a, "V", 6, 4), (b, "P", 0, 6)]
