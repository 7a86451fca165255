"""Replay a request trace through the real :class:`~portable_xy.engine.scheduler.Scheduler` in
simulated time: requests join the waiting queue when the clock passes their arrival, each step
advances the clock by its roofline time (:mod:`.step_model`), and a stage that reaches the end of its
sequence emits one token at the end of the step. When nothing is queued or running the clock jumps
to the next arrival. Prefix caching is off (synthetic prompts share nothing).

A run stops early as a *livelock* when, after the last arrival, the scheduler returns to a state it
was in since the last emitted token: its decisions depend only on that state, so it would cycle
forever (e.g. prefill-first under KV pressure: prefill chunks preempting each other while the
decoding sequences holding the blocks never get a step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...engine.block_manager import BlockManager
from ...engine.scheduler import Scheduler, SchedulerConfig
from ...engine.sequence import Sequence
from ...outputs import RequestMetrics
from ...sampling_params import SamplingParams
from .shapes import MODELS, rank_heads
from .step_model import DTYPE_BYTES, LAYERS, DeviceSpec, StageShape, step_time
from .trace import Request


@dataclass(frozen=True)
class SimConfig:
    model: str
    device: DeviceSpec
    policy: str = "tokenwise"
    budget: int = 2048  # max_num_batched_tokens
    max_num_seqs: int = 256
    kv_cache_gib: float = 40.0  # KV-cache memory (the device memory left after weights)
    block_size: int = 16
    chunk_align: int = 1
    tp: int = 1  # tensor-parallel devices (kv_cache_gib is per device; each holds its KV heads)

    @property
    def num_blocks(self) -> int:
        d = MODELS[self.model]
        per_token = 2 * LAYERS[self.model] * rank_heads(d, self.tp)[1] * d.head_dim * DTYPE_BYTES
        return int(self.kv_cache_gib * 2**30 // (per_token * self.block_size))


@dataclass
class StepRecord:
    start: float
    duration: float
    stages: tuple[tuple[int, str, int, int], ...]  # (request index, kind, start, num_tokens) per stage


@dataclass
class SimResult:
    config: SimConfig
    requests: list[Request]
    token_times: list[list[float]]  # per request: when each output token was emitted
    steps: int = 0
    busy_time: float = 0.0  # sum of the modelled step times
    idle_time: float = 0.0  # clock jumps to the next arrival
    end_time: float = 0.0
    preemptions: int = 0
    scheduled_tokens: int = 0
    livelock: bool = False
    records: list[StepRecord] = field(default_factory=list)  # filled only with keep_steps


def _state(sched: Scheduler) -> tuple:
    """Everything the scheduler's next decisions depend on (no prefix caching)."""
    running = tuple((s.seq_id, s.num_computed_tokens, s.num_tokens, len(s.block_table)) for s in sched.running)
    return running, tuple((s.seq_id, s.num_tokens) for s in sched.waiting), sched.bm.num_free_blocks


def simulate(reqs: list[Request], config: SimConfig, keep_steps: bool = False) -> SimResult:
    """Run ``reqs`` (sorted by arrival) to completion under ``config``; ``keep_steps`` records every
    step's token table."""
    bm = BlockManager(config.num_blocks, config.block_size, enable_prefix_caching=False)
    sched_cfg = SchedulerConfig(
        max_num_batched_tokens=config.budget,
        max_num_seqs=config.max_num_seqs,
        policy=config.policy,
        chunk_align=config.chunk_align,
    )
    sched = Scheduler(bm, sched_cfg)
    most = max(r.prompt_len + r.output_len for r in reqs)
    if -(-most // config.block_size) > config.num_blocks:
        raise ValueError(f"a {most}-token request does not fit the KV cache ({config.num_blocks} blocks)")
    res = SimResult(config, reqs, [[] for _ in reqs])
    params = SamplingParams(temperature=0)
    nxt, clock = 0, 0.0
    seen: set[tuple] = set()  # states since the last emitted token, once every request arrived
    while nxt < len(reqs) or sched.has_unfinished():
        if not sched.has_unfinished() and reqs[nxt].arrival > clock:
            res.idle_time += reqs[nxt].arrival - clock
            clock = reqs[nxt].arrival
        while nxt < len(reqs) and reqs[nxt].arrival <= clock:
            r = reqs[nxt]
            sched.add(Sequence(nxt, str(nxt), 0, [0] * r.prompt_len, params, None, RequestMetrics(r.arrival)))
            nxt += 1
        batch = sched.schedule()  # raises when requests are pending but none can be scheduled
        shapes = [StageShape(s.num_tokens, s.start, s.start + s.num_tokens == s.seq.num_tokens) for s in batch.stages]
        dt = step_time(config.model, config.device, shapes, config.tp)
        if keep_steps:
            table = tuple((s.seq.seq_id, s.kind, s.start, s.num_tokens) for s in batch.stages)
            res.records.append(StepRecord(clock, dt, table))
        clock += dt
        res.steps += 1
        res.busy_time += dt
        res.scheduled_tokens += batch.total_tokens
        sched.postprocess(batch)
        for st, shape in zip(batch.stages, shapes):
            if not shape.samples:
                continue
            seq = st.seq
            seq.token_ids.append(0)
            res.token_times[seq.seq_id].append(clock)
            if seq.num_output_tokens == reqs[seq.seq_id].output_len:
                sched.finish(seq)
        if any(sh.samples for sh in shapes) or nxt < len(reqs):
            seen.clear()
        elif (state := _state(sched)) in seen:
            res.livelock = True
            break
        else:
            seen.add(state)
    res.end_time = clock
    res.preemptions = sched.num_preemptions
    return res
