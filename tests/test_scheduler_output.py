"""The scheduler's contract (vLLM V1's): ``schedule()`` returns an immutable ``SchedulerOutput``,
drafts proposed before scheduling size the verify stages (nothing rewrites a stage afterwards),
``update_from_output`` applies the step, and only the scheduler and the block manager write a
sequence's scheduling state."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from portable_xy.engine.block_manager import BlockManager
from portable_xy.engine.scheduler import Draft, Scheduler, SchedulerConfig, Stage
from portable_xy.engine.sequence import Sequence
from portable_xy.outputs import RequestMetrics
from portable_xy.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
BS = 4


def _sched(k: int = 0, budget: int = 64, blocks: int = 64) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, num_speculative_tokens=k)
    return Scheduler(BlockManager(blocks, BS, False, False), cfg)


def _seq(sid: int, prompt: list[int], max_tokens: int = 20) -> Sequence:
    return Sequence(sid, str(sid), 0, prompt, SamplingParams(temperature=0, max_tokens=max_tokens), None,
                    RequestMetrics(0.0))  # fmt: skip


def _decoding(s: Scheduler, sid: int) -> Sequence:
    """A running sequence whose prompt is computed and that has sampled one token."""
    seq = _seq(sid, [1, 2, 3, 4, 5])
    s.add(seq)
    while seq.num_computed_tokens < 5:  # the prompt, in chunks under a small budget
        s.update_from_output(s.schedule(), {sid: 1})
    seq.token_ids.append(7)
    return seq


def test_output_is_immutable():
    s = _sched()
    s.add(_seq(0, [1, 2, 3]))
    out = s.schedule()
    assert out.num_scheduled_tokens == {0: 3} and out.stages[0].kind == "P"
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.stages[0].num_tokens = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.block_copies = ()
    with pytest.raises(TypeError):
        out.num_scheduled_tokens[0] = 9
    assert isinstance(out.stages, tuple) and isinstance(out.stages[0], Stage)


def test_drafts_ahead_size_the_verify_stage():
    s = _sched(k=4, budget=64)
    seq = _decoding(s, 0)
    assert s.spec_candidates() == [(seq, 4)]
    out = s.schedule({0: Draft([8, 9])})  # the proposer found 2 of 4
    (st,) = out.stages
    assert (st.kind, st.num_tokens) == ("V", 3) and out.num_spec_tokens == {0: 2}
    assert seq.draft_token_ids == [8, 9]
    assert s.update_from_output(out, {0: 2}) == {0: 1}  # one draft accepted, then the target's token
    assert seq.num_computed_tokens == 7 and seq.draft_token_ids == []


def test_drafts_ahead_are_cut_to_the_room():
    s = _sched(k=4, budget=3)
    _decoding(s, 0)
    out = s.schedule({0: Draft([8, 9, 10, 11])})
    assert out.num_scheduled_tokens == {0: 3} and out.num_spec_tokens == {0: 2}


def test_no_drafts_ahead_is_a_decode_and_in_step_drafts_fill_the_reservation():
    s = _sched(k=3)
    _decoding(s, 0)
    assert s.schedule({}).stages[0].kind == "D"  # ahead proposer found nothing
    s2 = _sched(k=3)
    seq = _decoding(s2, 0)
    out = s2.schedule()  # an in-step proposer: room reserved for k drafts
    assert out.num_spec_tokens == {0: 3}
    with pytest.raises(RuntimeError, match="gave 1 drafts for a verify stage of 3"):
        s2.update_draft_token_ids(out, {0: Draft([1])})
    s2.update_draft_token_ids(out, {0: Draft([1, 2, 3])})
    assert seq.draft_token_ids == [1, 2, 3]


def test_preempted_and_finished_ids_are_reported_once():
    s = _sched(budget=64, blocks=4)  # 16 token slots: two 5-token prompts fill them
    a, b = _seq(0, [1] * 5), _seq(1, [2] * 5)
    s.add(a)
    s.add(b)
    out = s.schedule()
    s.update_from_output(out, {0: 1, 1: 1})
    a.token_ids += [3, 3, 3, 3]  # a needs a third block: b is preempted
    out = s.schedule()
    assert out.preempted_seq_ids == {1} and b.num_computed_tokens == 0 and b.block_table == []
    s.update_from_output(out, {0: 1})
    s.finish(a)
    out = s.schedule()
    assert out.finished_seq_ids == {0} and not out.preempted_seq_ids
    assert not s.schedule().finished_seq_ids


def test_only_the_scheduler_and_block_manager_write_scheduling_state():
    """No other module assigns a sequence's status, computed tokens, block table or drafts."""
    pattern = re.compile(r"\.(status|num_computed_tokens|block_table|draft_token_ids|draft_probs|num_preemptions)"
                         r"\s*(=|\+=|-=)[^=]")  # fmt: skip
    allowed = {"portable_xy/engine/scheduler.py", "portable_xy/engine/block_manager.py",
               "portable_xy/engine/sequence.py"}  # fmt: skip
    writers = set()
    for path in (ROOT / "portable_xy").rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        if rel not in allowed and pattern.search(path.read_text()):
            writers.add(rel)
    assert writers == set()
