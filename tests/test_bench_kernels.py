"""``portable-xy bench kernels``: model shapes, step mixes, cost formulas, the JSON schema of tiny
CPU / interpreter runs, and that the vendor and per-stage attention paths compute what the
backend's attention computes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from portable_xy.backends import get_backend
from portable_xy.backends.reference import stage_mask
from portable_xy.cli import main
from portable_xy.tools.bench import kernels as bk
from portable_xy.tools.bench.impls import attention_impls
from portable_xy.tools.bench.shapes import attention_cases, gemm_shapes, mixed_step


def test_model_shapes_per_rank():
    got = {(s.model, s.op): (s.N, s.K) for m in ("llama2-7b", "qwen2-7b", "qwen2.5-72b") for s in gemm_shapes(m)}
    # Llama-2-7B: 32 heads / 32 KV heads of 128, intermediate 11008 -> 4 + 4 + 4 heads per rank
    assert got["llama2-7b", "qkv"] == (12 * 128, 4096)
    assert got["llama2-7b", "o"] == (4096, 512)
    assert got["llama2-7b", "gate_up"] == (2 * 1376, 4096)
    assert got["llama2-7b", "down"] == (4096, 1376)
    # Qwen2-7B: 28 heads round up to 4 per rank, 4 KV heads replicated to 1 per rank
    assert got["qwen2-7b", "qkv"] == (6 * 128, 3584)
    assert got["qwen2-7b", "down"] == (3584, 2368)
    # Qwen2.5-72B: 64 heads / 8 KV heads -> 8 + 1 + 1; intermediate 29568 / 8 = 3696
    assert got["qwen2.5-72b", "qkv"] == (10 * 128, 8192)
    assert got["qwen2.5-72b", "gate_up"] == (7392, 8192)
    assert all(n >= 16 and k >= 16 for n, k in ((s.N, s.K) for s in gemm_shapes("llama2-7b", scale=32)))


@pytest.mark.parametrize("tiny", [True, False])
def test_attention_cases(tiny):
    cases = {c.name: c for c in attention_cases(tiny)}
    assert {c.group for c in cases.values()} == {"mixed", "prefix", "chunked", "verify", "decode"}
    budget = 64 if tiny else 4096
    for c in cases.values():
        assert len(c.query_lens) == len(c.seq_lens) and all(0 < q <= s for q, s in zip(c.query_lens, c.seq_lens))
        assert c.num_tokens <= budget
    if not tiny:
        assert cases["verify_4x31"].query_lens == [32] * 4 and cases["verify_8x15"].query_lens == [16] * 8
        assert cases["decode_b128_c4096"].seq_lens == [4096] * 128
        assert cases["prefix_4096"].seq_lens[0] - cases["prefix_4096"].query_lens[0] == 4096


def test_mixed_step_fills_the_budget_with_decodes_verifies_and_prefills():
    step = mixed_step("conversation", 4096, 256, seed=3)
    assert step.num_tokens == 4096
    qls = step.query_lens
    assert 1 in qls and 4 in qls and any(q > 4 for q in qls)
    assert qls.index(max(qls)) > qls.index(1)  # decodes first, then prefill chunks
    assert mixed_step("conversation", 4096, 256, seed=3).query_lens == qls  # seeded


def test_attention_cost_counts_visible_pairs():
    case = mixed_step("coding", 64, 8, scale=32)
    hq, hkv, d = 4, 2, 32
    flops, nbytes = bk.attention_cost(case, hq, hkv, d, 2)
    pairs = sum(int(stage_mask(q, s, None, torch.device("cpu")).sum()) for q, s in zip(case.query_lens, case.seq_lens))
    assert flops == 4 * pairs * hq * d
    assert nbytes == 2 * (2 * case.num_tokens * hq * d + 2 * sum(case.seq_lens) * hkv * d)
    assert bk.gemm_cost(3, 5, 7, 4) == (2 * 3 * 5 * 7, 4 * (3 * 7 + 5 * 7 + 3 * 5))


def _check_report(report: dict, backend: str, gemm_impls: set, attn_impls: set) -> None:
    assert bk.validate_report(report) == []
    assert report["env"]["backend"] == backend and report["env"]["profile"] == backend
    assert report["env"]["torch"] == torch.__version__
    assert report["timing"]["method"] == "perf_counter" and report["tiny"] is True
    rows = report["results"]
    for r in rows:
        for key in ("latency_s", "tflops", "gbps", "flops", "bytes"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["case"], r["impl"], key)
        assert r["utilisation"] == max(r["frac_peak_flops"], r["frac_peak_bw"])
        assert r["tflops"] == pytest.approx(r["flops"] / r["latency_s"] / 1e12)
        if r["kernel"] == "gemm":
            p = r["params"]
            assert r["flops"] == 2 * p["M"] * p["N"] * p["K"]
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], {}).setdefault(r["case"], set()).add(r["impl"])
    assert all(impls == gemm_impls for impls in by_kernel["gemm"].values())
    assert all(impls == attn_impls for impls in by_kernel["attention"].values())
    json.loads(json.dumps(report))


def test_cpu_tiny_run_via_cli(tmp_path):
    out = tmp_path / "cpu.json"
    args = ["bench", "kernels", "--backend", "cpu", "--model-shapes", "qwen2-7b", "--out", str(out), "--reps", "1",
            "--warmup", "0", "--peak-tflops", "0.5", "--peak-gbps", "20"]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    _check_report(report, "cpu", {"smooth_gemm", "vendor"}, {"meta_attention", "per_stage", "vendor"})
    assert report["peaks"] == {"tflops": 0.5, "gbps": 20.0}
    cases = {r["case"] for r in report["results"]}
    assert len([c for c in cases if c.startswith("qwen2-7b/qkv/")]) == 4  # the tiny M sweep
    assert len([c for c in cases if "/decode_" in c]) == 4


def test_interpret_tiny_run_uses_the_triton_kernels():
    report = bk.run_kernel_bench(
        "interpret", ["llama2-7b"], reps=1, warmup=0, case_filter="qkv/M=33|mixed_coding", log=lambda *_: None
    )
    attn = {"meta_attention", "per_stage", "vendor"}
    _check_report(report, "interpret", {"smooth_gemm", "single_tile", "vendor"}, attn)
    by = {(r["case"], r["impl"]): r for r in report["results"]}
    assert "r@" in by["llama2-7b/qkv/M=33", "smooth_gemm"]["detail"]  # the plan is recorded
    assert "64x64x32" in by["llama2-7b/qkv/M=33", "single_tile"]["detail"]  # the largest interpreter tile
    assert report["peaks"]["tflops"] == 0.001  # from the interpreter profile


def _check_quant_rows(report: dict, backend: str, cases: set[str]) -> dict:
    assert bk.validate_report(report) == [] and report["errors"] == []
    assert report["env"]["backend"] == backend
    by = {(r["case"], r["impl"]): r for r in report["results"]}
    assert {r["kernel"] for r in report["results"]} == {"quant_gemm"}
    assert {c for c, _ in by} == cases
    for case in cases:
        rows = {impl: by[case, impl] for impl in ("quant_gemm", "smooth_gemm", "vendor")}
        assert len({c for c, _ in by if c == case}) == 1 and len([k for k in by if k[0] == case]) == 3
        p = rows["quant_gemm"]["params"]
        for r in rows.values():
            assert r["flops"] == 2 * p["M"] * p["N"] * p["K"] and math.isfinite(r["latency_s"]) and r["latency_s"] > 0
            assert r["shape"] == case.rsplit("/", 1)[0] and r["params"]["qtype"] in case
        # per-impl traffic: the quantized weight is smaller than its 16/32-bit dequantized form
        assert rows["quant_gemm"]["bytes"] < rows["smooth_gemm"]["bytes"] == rows["vendor"]["bytes"]
        assert p["qtype"] in rows["quant_gemm"]["detail"]
    return by


def test_interpret_tiny_quant_gemm_runs_the_triton_kernel():
    report = bk.run_kernel_bench(
        "interpret", ["llama2-7b"], reps=1, warmup=0, kernels=("quant_gemm",), qtypes=("q4_0", "q8_0"),
        case_filter=r"qkv/q(4|8)_0/M=(1|33)$", log=lambda *_: None,
    )  # fmt: skip
    cases = {f"llama2-7b/qkv/{q}/M={m}" for q in ("q4_0", "q8_0") for m in (1, 33)}
    by = _check_quant_rows(report, "interpret", cases)
    assert "split-K" in by["llama2-7b/qkv/q4_0/M=1", "quant_gemm"]["detail"]  # decode: the split-K plan
    assert "r@" in by["llama2-7b/qkv/q8_0/M=33", "quant_gemm"]["detail"]  # the tiled plan
    assert "r@" in by["llama2-7b/qkv/q8_0/M=33", "smooth_gemm"]["detail"]


def test_cpu_quant_gemm_via_cli_and_bad_qtypes(tmp_path, capsys):
    out = tmp_path / "q.json"
    args = ["bench", "kernels", "--backend", "cpu", "--model-shapes", "llama2-7b", "--kernels", "quant_gemm",
            "--qtypes", "q4_1", "--m-values", "7", "--filter", "qkv|/o/", "--out", str(out), "--reps", "1",
            "--warmup", "0"]  # fmt: skip
    assert main(args) == 0
    # tiny llama2-7b O has K = 512 / 32 = 16, not a multiple of the quantization block: skipped
    _check_quant_rows(json.loads(out.read_text()), "cpu", {"llama2-7b/qkv/q4_1/M=7"})
    assert main(args[:-6] + ["--qtypes", "q5_k"]) == 2
    assert "--qtypes takes" in capsys.readouterr().err


def _check_moe_rows(report: dict, backend: str, cases: set[str]) -> dict:
    assert bk.validate_report(report) == [] and report["errors"] == []
    assert report["env"]["backend"] == backend
    by = {(r["case"], r["impl"]): r for r in report["results"]}
    assert {r["kernel"] for r in report["results"]} == {"moe"}
    assert set(by) == {(c, impl) for c in cases for impl in ("fused_moe", "per_expert")}
    for (case, _), r in by.items():
        p = r["params"]
        assert r["shape"] == case.rsplit("/", 1)[0] and case.endswith(f"/M={p['M']}")
        assert r["flops"] == 6 * p["M"] * p["top_k"] * p["hidden"] * p["intermediate"]
        assert r["bytes"] >= 3 * p["hidden"] * p["intermediate"] * 4  # at least one expert's weights
    return by


def test_interpret_tiny_moe_runs_the_fused_kernel():
    report = bk.run_kernel_bench(
        "interpret", ["llama2-7b"], reps=1, warmup=0, kernels=("moe",), case_filter=r"qwen3-30b-a3b/moe/M=(1|7)$",
        log=lambda *_: None,
    )  # fmt: skip
    by = _check_moe_rows(report, "interpret", {"qwen3-30b-a3b/moe/M=1", "qwen3-30b-a3b/moe/M=7"})
    detail = by["qwen3-30b-a3b/moe/M=1", "fused_moe"]["detail"]
    assert "A=8" in detail and "experts=8/128" in detail  # the plan: 1 token x top-8
    assert by["qwen3-30b-a3b/moe/M=1", "fused_moe"]["params"]["experts"] == 128


def test_per_expert_baseline_computes_the_reference_moe():
    from portable_xy.backends.reference import fused_moe_ref, moe_route_ref
    from portable_xy.tools.bench.impls import per_expert_moe

    gen = torch.Generator().manual_seed(2)
    x, w13, w2 = (torch.randn(*shape, generator=gen) for shape in ((9, 32), (4, 48, 32), (4, 32, 24)))
    weights, ids = moe_route_ref(torch.randn(9, 4, generator=gen), 2, False)
    want = fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(per_expert_moe(x, w13, w2, weights, ids), want, atol=1e-4, rtol=1e-4)


def test_cpu_moe_via_cli(tmp_path):
    out = tmp_path / "moe.json"
    args = ["bench", "kernels", "--backend", "cpu", "--kernels", "moe", "--m-values", "5", "--out", str(out),
            "--reps", "1", "--warmup", "0"]  # fmt: skip
    assert main(args) == 0
    _check_moe_rows(json.loads(out.read_text()), "cpu", {"mixtral-8x7b/moe/M=5", "qwen3-30b-a3b/moe/M=5"})


def test_a_failing_call_is_recorded_and_the_run_goes_on(monkeypatch):
    from portable_xy.tools.bench import impls

    real = impls.gemm_impls

    def with_failure(backend, x, w):
        def boom():
            raise RuntimeError("no such kernel")

        return {**real(backend, x, w), "single_tile": (boom, "fails")}

    monkeypatch.setattr(impls, "gemm_impls", with_failure)
    report = bk.run_kernel_bench("cpu", ["llama2-7b"], reps=1, warmup=0, case_filter="qkv/M=7$", log=lambda *_: None)
    assert bk.validate_report(report) == []
    assert [(e["case"], e["impl"]) for e in report["errors"]] == [("llama2-7b/qkv/M=7", "single_tile")]
    assert "no such kernel" in report["errors"][0]["error"]
    assert {r["impl"] for r in report["results"]} == {"smooth_gemm", "vendor"}


def test_validate_report_flags_problems():
    good = {k: None for k in bk.TOP_KEYS} | {"schema": bk.SCHEMA, "schema_version": bk.SCHEMA_VERSION, "results": []}
    assert bk.validate_report(good) == []
    assert bk.validate_report({k: v for k, v in good.items() if k != "env"}) == ["missing key 'env'"]
    row = {k: 0 for k in bk.RESULT_KEYS} | {"case": "c", "impl": "i", "latency_s": float("nan")}
    assert "latency" in bk.validate_report(good | {"results": [row]})[0]
    assert "missing" in bk.validate_report(good | {"results": [{"case": "c"}]})[0]
    assert "schema" in bk.validate_report(good | {"schema_version": 0})[0]


def test_baselines_compute_the_same_attention():
    backend = get_backend("cpu")
    case = mixed_step("conversation", 64, 8, scale=32)
    gen = torch.Generator().manual_seed(1)
    q, kc, vc, meta = bk.attention_inputs(case, 4, 2, 32, 16, torch.float32, torch.device("cpu"), gen)
    impls = attention_impls(backend, q, kc, vc, meta, 32**-0.5)
    ref = impls["meta_attention"][0]()
    per_stage = torch.cat(impls["per_stage"][0]())
    vendor = torch.cat([o[0].transpose(0, 1) for o in impls["vendor"][0]()])
    torch.testing.assert_close(per_stage, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vendor, ref, atol=1e-5, rtol=1e-5)


def test_bench_package_is_packaged():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "portable_xy.tools.bench" in pyproject["tool"]["setuptools"]["packages"]
