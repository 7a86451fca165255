"""``portable-xy bench simulate``: the roofline step time against a hand computation, the replay's
invariants (clock = sum of step times, exact output lengths, budget, arrivals), metrics and goodput
on hand-made timelines, token-wise vs prefill-first TBT under long prompts, traces, and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from portable_xy.cli import main
from portable_xy.tools.bench.sim_metrics import Slo, completion_rate, summarize
from portable_xy.tools.bench.simulate import SimConfig, SimResult, simulate
from portable_xy.tools.bench.step_model import DeviceSpec, StageShape, device_spec, step_time
from portable_xy.tools.bench.trace import Request, load_trace, mean_rate, rescale, synthetic_trace

POLICIES = ("tokenwise", "prefill_first", "decode_first")


def _llama2_step_by_hand(peak_flops: float, peak_bw: float, overhead: float) -> float:
    """One Llama-2-7B step of stages (q=3 after 5), (q=1 after 10), (q=4 after 0, not sampling)."""
    T, H, I, d, heads, L, V = 8, 4096, 11008, 128, 32, 32, 32000  # noqa: E741

    def kern(flops, nbytes):
        return max(flops / peak_flops, nbytes / peak_bw)

    layer = 0.0
    for N, K in ((3 * H, H), (H, H), (2 * I, H), (H, I)):  # QKV, O, GateUp, Down
        layer += kern(2 * T * N * K, 2 * (N * K + T * K + T * N))
    # causal areas: 3 rows over 6, 7, 8 keys; 1 row over 11; 4 rows over 1..4 -> 21 + 11 + 10 keys
    attn_flops = 4 * d * heads * (6 + 7 + 8 + 11 + 1 + 2 + 3 + 4)
    attn_bytes = 2 * (2 * heads * d * (8 + 11 + 4) + 2 * heads * d * T)
    layer += kern(attn_flops, attn_bytes)
    head = kern(2 * 2 * V * H, 2 * (V * H + 2 * H + 2 * V))
    return overhead + L * layer + head


@pytest.mark.parametrize("peaks", [(1e12, 1e9), (1e9, 1e15), (1e14, 1e12)], ids=["memory", "compute", "mixed"])
def test_step_time_matches_hand_computation(peaks):
    dev = DeviceSpec("test", peaks[0], peaks[1], flops_eff=1.0, bw_eff=1.0, step_overhead=1e-3)
    stages = [StageShape(3, 5, True), StageShape(1, 10, True), StageShape(4, 0, False)]
    assert step_time("llama2-7b", dev, stages) == pytest.approx(_llama2_step_by_hand(*peaks, 1e-3), rel=1e-12)
    derated = DeviceSpec("test", peaks[0] / 0.5, peaks[1] / 0.25, flops_eff=0.5, bw_eff=0.25, step_overhead=1e-3)
    assert step_time("llama2-7b", derated, stages) == pytest.approx(step_time("llama2-7b", dev, stages), rel=1e-12)


def test_device_spec_reads_profiles():
    h100, npu = device_spec("cuda/sm90"), device_spec("ascend/910b")
    assert (h100.peak_flops, h100.peak_bw) == (989e12, 3350e9)
    assert (npu.peak_flops, npu.peak_bw) == (313e12, 1600e9)
    with pytest.raises(ValueError):
        device_spec("cpu")


def test_tensor_parallel_step_time_by_hand():
    """TP=2 Llama-2-70B decode of 2 tokens on a memory-bound device: per-rank weights read once
    per step, plus 2 x 80 + 1 all-reduces of 2 x 8192 x 2 bytes and the logits gather."""
    bw, link, lat = 1e12, 1e11, 5e-6
    dev = DeviceSpec("test", 1e18, bw, 1.0, 1.0, 0.0, link_bw=link, link_latency=lat, link_eff=1.0)
    stages = [StageShape(1, 0, True), StageShape(1, 0, True)]
    T, H, I, L, V, tp = 2, 8192, 28672, 80, 32000, 2  # noqa: E741
    qkv = (32 + 2 * 4) * 128  # 32 query heads, 4 KV heads per rank
    layer = sum(2 * (N * K + T * K + T * N) / bw for N, K in ((qkv, H), (H, 32 * 128), (I, H), (H, I // 2)))
    layer += 2 * (2 * 4 * 128 * 2 + 2 * 32 * 128 * 2) / bw  # K/V of 1 position per stage, Q in, O out
    head = 2 * (V // 2 * H + T * H + T * V // 2) / bw
    comm = (2 * L + 1) * (lat + T * H * 2 / link) + lat + (T * V * 4) / 2 / link
    assert step_time("llama2-70b", dev, stages, tp) == pytest.approx(L * layer + head + comm, rel=1e-9)
    with pytest.raises(ValueError, match="interconnect"):
        step_time("llama2-70b", DeviceSpec("bare", 1e15, 1e12), stages, 2)


def test_simulate_tp_labels_and_auto_kv_cache():
    from portable_xy.tools.bench.sim_report import SweepSpec, kv_cache_gib, split_model

    assert split_model("qwen2.5-72b@tp8") == ("qwen2.5-72b", 8) and split_model("llama2-7b") == ("llama2-7b", 1)
    for bad in ("llama2-7b@tp3", "llama2-7b@tp", "qwen2-7b@tp8"):  # 32 heads / 3; no degree; 28 heads / 8
        with pytest.raises(ValueError):
            split_model(bad)
    spec = SweepSpec(["cuda/sm90"], ["llama2-70b@tp4"], ["chat"], ["tokenwise"], kv_cache_gib=None)
    h100 = device_spec("cuda/sm90")
    assert kv_cache_gib(spec, h100, "llama2-70b", 8) > kv_cache_gib(spec, h100, "llama2-70b", 4) > 30
    with pytest.raises(ValueError, match="does not fit"):
        kv_cache_gib(spec, h100, "llama2-70b", 1)
    assert SimConfig("llama2-70b", h100, tp=8).num_blocks == 8 * SimConfig("llama2-70b", h100).num_blocks


def _mixed_requests() -> list[Request]:
    lens = [(40, 30), (300, 5), (7, 60), (120, 1), (500, 20), (33, 33), (64, 90), (250, 12), (90, 45), (16, 2)]
    return [Request(0.013 * i + (5.0 if i >= 7 else 0.0), p, o) for i, (p, o) in enumerate(lens)]


TIGHT_KV = 0.3125  # GiB: 40 blocks of 16 Llama-2-7B tokens, fewer than the requests hold together


def _config(policy: str, kv_gib: float) -> SimConfig:
    return SimConfig("llama2-7b", device_spec("ascend/910b"), policy, budget=96, kv_cache_gib=kv_gib, chunk_align=16)


@pytest.mark.parametrize(
    "policy, kv_gib",
    [(p, 1.0) for p in POLICIES] + [("tokenwise", TIGHT_KV), ("decode_first", TIGHT_KV)],
)
def test_replay_invariants(policy, kv_gib):
    reqs = _mixed_requests()
    cfg = _config(policy, kv_gib)
    res = simulate(reqs, cfg, keep_steps=True)
    recs = res.records
    assert len(recs) == res.steps
    assert res.busy_time == pytest.approx(sum(r.duration for r in recs), rel=1e-12)
    assert res.end_time == pytest.approx(res.busy_time + res.idle_time, rel=1e-12)
    assert res.idle_time > 0  # the last three arrive after the first seven finished
    for a, b in zip(recs, recs[1:]):
        assert b.start >= a.start + a.duration - 1e-12
    computed, produced = [0] * len(reqs), [0] * len(reqs)
    for rec in recs:
        assert 0 < sum(n for *_, n in rec.stages) <= cfg.budget
        shapes = []
        for i, kind, start, n in rec.stages:
            assert reqs[i].arrival <= rec.start and produced[i] < reqs[i].output_len
            assert kind in "PD" and (kind == "P" or n == 1)
            if start < computed[i]:  # preempted: recomputed from scratch
                assert start == 0 and kv_gib < 1
            computed[i] = start + n
            samples = start + n == reqs[i].prompt_len + produced[i]
            produced[i] += samples
            shapes.append(StageShape(n, start, samples))
        assert rec.duration == pytest.approx(step_time(cfg.model, cfg.device, shapes), rel=1e-12)
    assert produced == [r.output_len for r in reqs]
    for r, times in zip(reqs, res.token_times):
        assert len(times) == r.output_len
        assert times[0] > r.arrival and all(np.diff(times) > 0)
    assert not res.livelock
    assert (res.preemptions > 0) == (kv_gib < 1 and policy == "tokenwise")


def test_prefill_first_does_not_livelock_under_kv_pressure():
    """Regression: prefill-first prefills used to preempt each other forever under KV pressure
    while the decoding sequences holding the blocks never ran. Now every request finishes."""
    reqs = _mixed_requests()
    res = simulate(reqs, _config("prefill_first", TIGHT_KV))
    assert not res.livelock
    assert all(len(t) == r.output_len for r, t in zip(reqs, res.token_times))


def test_livelock_is_detected(monkeypatch):
    """A scheduler that preempts every running sequence before each step: a prompt longer than the
    budget never completes, no token is emitted after the last arrival, and the replay stops and
    says so (unfinished requests count as missing the SLO)."""
    from portable_xy.engine.scheduler import Scheduler

    real = Scheduler.schedule

    def stuck(self):
        for seq in list(self.running):
            self._preempt(seq)
        return real(self)

    monkeypatch.setattr(Scheduler, "schedule", stuck)
    reqs = [Request(0.0, 300, 5), Request(0.0, 10, 2)]  # budget 96: 300 tokens take 4 steps
    res = simulate(reqs, _config("tokenwise", 1.0))
    assert res.livelock
    row = summarize(res, 1.0, Slo(ttft=100.0, tbt=100.0))
    done = sum(len(t) == r.output_len for r, t in zip(reqs, res.token_times))
    assert row["livelock"] and row["completed"] == done < len(reqs)
    assert row["slo_attainment"] == done / len(reqs) and row["ttft_p99_ms"] is None


def test_metrics_and_goodput_on_a_hand_made_timeline():
    reqs = [Request(0.0, 10, 3), Request(1.0, 10, 2), Request(2.0, 10, 1), Request(3.0, 10, 3)]
    times = [[0.5, 0.6, 0.7], [3.5, 3.55], [2.1], [3.2, 3.3, 3.55]]
    res = SimResult(SimConfig("qwen2-7b", device_spec("cuda/sm90")), reqs, times, steps=4, end_time=4.0)
    row = summarize(res, 1.0, Slo(ttft=1.0, tbt=0.2))
    # TTFTs 0.5, 2.5, 0.1, 0.2; gaps 0.1, 0.1, 0.05, 0.1, 0.25; request 1 misses TTFT, request 3 misses TBT
    assert row["ttft_p50_ms"] == pytest.approx(350.0) and row["tbt_max_ms"] == pytest.approx(250.0)
    assert row["tbt_p50_ms"] == pytest.approx(100.0)
    assert row["slo_attainment"] == 0.5 and row["goodput_rps"] == 0.5 and row["throughput_rps"] == 1.0
    assert row["output_tps"] == pytest.approx(9 / 4)
    assert summarize(res, 1.0, Slo(ttft=3.0, tbt=0.3))["goodput_rps"] == 1.0
    assert summarize(res, 3.0, Slo(ttft=1.0, tbt=0.2))["goodput_rps"] == 1.5


def test_completion_rate_drops_ramp_up_and_tail():
    reqs = [Request(0.0, 10, 1)] * 20
    ends = [5.0] + [10.0 + 2 * i for i in range(18)] + [100.0]  # counted: 3rd (12 s) to 18th (42 s)
    res = SimResult(SimConfig("qwen2-7b", device_spec("cuda/sm90")), reqs, [[e] for e in ends], end_time=100.0)
    assert completion_rate(res) == pytest.approx(15 / 30)
    res.token_times = [[1.0]] * 20
    assert completion_rate(res) == pytest.approx(20 / 100)


def test_tokenwise_bounds_tbt_under_long_prompts():
    """Eight decoding requests, then a 4000-token prompt every 50 ms: prefill-first stalls the decoders
    for whole prefill steps, token-wise keeps them in every step."""
    reqs = [Request(0.0, 100, 200) for _ in range(8)] + [Request(0.3 + 0.05 * i, 4000, 4) for i in range(12)]
    worst = {}
    for policy in ("tokenwise", "prefill_first"):
        res = simulate(reqs, SimConfig("qwen2-7b", device_spec("cuda/sm90"), policy, budget=2048))
        worst[policy] = max(float(np.max(np.diff(t))) for t in res.token_times[:8])
    assert worst["tokenwise"] <= worst["prefill_first"]
    assert worst["tokenwise"] < 0.5 * worst["prefill_first"]


def test_synthetic_trace_is_seeded_clipped_and_poisson():
    a = synthetic_trace("coding", 5.0, 400, seed=3)
    assert a == synthetic_trace("coding", 5.0, 400, seed=3) and a != synthetic_trace("coding", 5.0, 400, seed=4)
    assert all(r.output_len <= 1024 and r.prompt_len + r.output_len <= 4096 for r in a)
    assert all(x.arrival < y.arrival for x, y in zip(a, a[1:]))
    assert mean_rate(a) == pytest.approx(5.0, rel=0.15)
    assert np.median([r.prompt_len for r in a]) == pytest.approx(1800, rel=0.15)
    with pytest.raises(ValueError):
        synthetic_trace("chat", 1.0, 3)


def test_jsonl_trace_and_rescale(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = ['{"arrival": 2, "prompt_len": 5, "output_len": 2}', "", '{"arrival": 0, "prompt_len": 9, "output_len": 1}']
    path.write_text("\n".join(lines) + "\n")
    reqs = load_trace(path)
    assert reqs == [Request(0.0, 9, 1), Request(2.0, 5, 2)]
    assert [r.arrival for r in rescale(reqs, 2.0)] == [0.0, 0.5]
    path.write_text('{"arrival": 0, "prompt_len": 0, "output_len": 2}\n')
    with pytest.raises(ValueError, match="t.jsonl:1"):
        load_trace(path)


def test_cli_writes_report(tmp_path):
    out = tmp_path / "sim"
    args = ["bench", "simulate", "--profile", "cuda/sm90", "--models", "qwen2-7b", "--workloads", "conversation",
            "--num-requests", "4", "--rates", "1,4", "--kv-cache-gib", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "simulator.json").read_text())
    rows = report["rows"]
    assert [(r["rate"], r["policy"]) for r in rows] == [(rate, p) for rate in (1.0, 4.0) for p in POLICIES]
    assert all(r["requests"] == 4 and r["profile"] == "cuda/sm90" and r["model"] == "qwen2-7b" for r in rows)
    assert all(0 <= r["goodput_rps"] <= r["rate"] and r["completed"] == 4 for r in rows)
    assert len(report["capacity"]) == 1 and report["capacity"][0]["capacity_rps"] > 0
    assert [(c["policy"], c["rate"], len(c["tbt_quantiles_ms"])) for c in report["tbt_cdf"]] == [
        (p, 1.0, 101) for p in POLICIES
    ]
    md = (out / "simulator.md").read_text()
    assert "| cuda/sm90 | qwen2-7b | conversation |" in md and "--rates 1,4" in md
    assert md.count("| 4.0 | ") == 3
    for kind in ("goodput", "tbt_cdf"):
        png = out / "img" / f"sim_{kind}_cuda_sm90.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size < 100_000


def test_cli_with_a_trace_file(tmp_path):
    trace = tmp_path / "burst.jsonl"
    trace.write_text("".join(f'{{"arrival": {0.1 * i}, "prompt_len": {50 + i}, "output_len": 6}}\n' for i in range(6)))
    out = tmp_path / "sim"
    args = ["bench", "simulate", "--profile", "ascend/910b", "--models", "llama2-7b", "--policies", "tokenwise",
            "--trace", str(trace), "--rates", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((out / "simulator.json").read_text())["rows"]
    assert [(r["workload"], r["policy"], r["requests"]) for r in rows] == [("burst", "tokenwise", 6)]
