"""``portable-xy bench e2e`` on a tiny random model: the workload generators, the report's fields
and numbers, HF in the same run, and vLLM skipped cleanly when it is not installed."""

from __future__ import annotations

import importlib.util
import json

import pytest

from portable_xy.cli import main
from portable_xy.tools.bench import e2e


def test_synthetic_workload_is_seeded_and_clipped():
    a = e2e.synthetic_workload(20, 64, 16, 0.8, 7, 1000, 100)
    assert a == e2e.synthetic_workload(20, 64, 16, 0.8, 7, 1000, 100)
    assert a != e2e.synthetic_workload(20, 64, 16, 0.8, 8, 1000, 100)
    assert all(len(r.prompt_token_ids) + r.output_len <= 100 and r.output_len >= 1 for r in a)
    assert all(3 <= t < 1000 for r in a for t in r.prompt_token_ids)
    fixed = e2e.synthetic_workload(3, 10, 5, 0.0, 0, 1000, 100)
    assert [(len(r.prompt_token_ids), r.output_len) for r in fixed] == [(10, 5)] * 3


def test_summarize_percentiles():
    timings = [e2e.Timing(ttft=0.1 * i, latency=0.1 * i + 0.4, output_len=5) for i in range(1, 6)]
    m = e2e.summarize(timings, wall=2.0, input_tokens=100)
    assert m["output_tokens"] == 25 and m["output_tok_s"] == 12.5 and m["total_tok_s"] == 62.5
    assert m["ttft_p50"] == pytest.approx(0.3) and m["ttft_p99"] == pytest.approx(0.496)
    assert m["tpot_p50"] == pytest.approx(0.1)


def test_e2e_tiny_model_vs_hf(tmp_path, tiny_llama):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello there", "output_len": 3}\n{"prompt_token_ids": [5, 6, 7, 8]}\n')
    out = tmp_path / "e2e.json"
    args = ["bench", "e2e", "--model", tiny_llama, "--backend", "cpu", "--dtype", "float32", "--prompts", str(prompts),
            "--output-len", "4", "--compare-hf", "--compare-vllm", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["schema"] == e2e.SCHEMA and report["schema_version"] == e2e.SCHEMA_VERSION
    assert report["workload"]["num_requests"] == 2 and report["workload"]["output_tokens"] == 7
    for name in ("ours", "hf"):
        m = report["engines"][name]
        assert m["output_tokens"] == 7 and m["num_requests"] == 2
        for key in (
            "wall_s",
            "output_tok_s",
            "total_tok_s",
            "req_s",
            "ttft_p50",
            "ttft_p99",
            "tpot_p50",
            "latency_p99",
        ):
            assert m[key] > 0, (name, key)
        assert m["ttft_p50"] <= m["latency_p50"] and m["ttft_p50"] <= m["ttft_p99"]
    r = report["ratios"]["hf"]
    assert r["output_tok_s"] == pytest.approx(
        report["engines"]["ours"]["output_tok_s"] / report["engines"]["hf"]["output_tok_s"]
    )
    if importlib.util.find_spec("vllm") is None:
        assert "not installed" in report["engines"]["vllm"]["skipped"] and "vllm" not in report["ratios"]


def test_e2e_synthetic_workload(tiny_llm):
    reqs = e2e.synthetic_workload(4, 12, 3, 0.5, 0, tiny_llm.model_config.vocab_size, tiny_llm.max_model_len)
    m = e2e.run_ours(tiny_llm, reqs)
    assert m["num_requests"] == 4 and m["output_tokens"] == sum(r.output_len for r in reqs)
    assert m["output_tok_s"] > 0 and m["ttft_p99"] >= m["ttft_p50"] > 0
