"""AOT CUDA compile report (no GPU needed): every real kernel config compiles for sm_80 and sm_90
without spills, within shared memory and with tensor cores where its spec expects them; and the
checker really flags bad configs (spills, shared memory overflow, missing tensor cores)."""

from __future__ import annotations

import json
import os

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

if not (
    hasattr(triton, "compile")
    and os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
):
    pytest.skip("needs upstream triton with its bundled NVIDIA tools (cuobjdump)", allow_module_level=True)

from portable_xy.triton_kernels import aot  # noqa: E402


@pytest.fixture(autouse=True)
def _no_tuned_profiles(tmp_path, monkeypatch):
    # the report must judge the shipped profiles, not whatever a local tuner run left behind
    monkeypatch.setenv("PORTABLE_XY_PROFILE_DIR", str(tmp_path / "tuned"))


@triton.jit
def _toy_gemm(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bk,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(b_ptr + (k + rk)[:, None] * stride_bk + rn[None, :], mask=rn[None, :] < N, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _toy_spec(name, bm, bn, bk, dtype="fp16", warps=4, stages=3, precision="tf32", expect=True):
    return {
        "name": name,
        "fn": _toy_gemm,
        "signature": {
            "a_ptr": f"*{dtype}",
            "b_ptr": f"*{dtype}",
            "c_ptr": "*fp32",
            "M": "i32",
            "N": "i32",
            "K": "i32",
            "stride_am": "i32",
            "stride_bk": "i32",
            "stride_cm": "i32",
        },
        "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PRECISION": precision},
        "num_warps": warps,
        "num_stages": stages,
        "expect_tensor_cores": expect,
        "divisible_by_16": ["K", "stride_am", "stride_bk", "stride_cm"],
    }


def _one(spec, arch):
    return aot.compile_spec(spec, arch, "test")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_good_gemm_passes(arch):
    rep = _one(_toy_spec("toy_good", 64, 64, 32), arch)
    assert rep.compiled, rep.error
    assert rep.verdict in ("OK", "WARN"), rep.problems
    assert rep.spill_stores == 0 and rep.spill_loads == 0
    assert 0 < rep.smem_bytes <= rep.smem_limit
    assert rep.registers and rep.registers <= 255
    if arch == "sm_90":
        assert rep.sass_counts["HGMMA"] > 0  # 64-row tile, 4 warps: wgmma
    else:
        assert rep.sass_counts["HMMA"] > 0


def test_small_m_tile_on_sm90_accepts_mma_sync():
    # a 16-row (decode) tile cannot use wgmma (M must be a multiple of 64): HMMA is the right code
    rep = _one(_toy_spec("toy_decode", 16, 64, 64), "sm_90")
    assert rep.verdict in ("OK", "WARN"), rep.problems
    assert rep.sass_counts["HGMMA"] == 0 and rep.sass_counts["HMMA"] > 0
    assert rep.wgmma_applicable is False


def test_fp32_ieee_dot_misses_tensor_cores():
    # an fp32 dot at IEEE precision runs on FFMA: a spec claiming tensor cores must fail
    spec = _toy_spec("toy_fp32", 64, 64, 32, dtype="fp32", precision="ieee", expect=True)
    for arch in ("sm_80", "sm_90"):
        rep = _one(spec, arch)
        assert rep.compiled, rep.error
        assert rep.verdict == "FAIL"
        assert any("tensor cores" in p or "HGMMA" in p for p in rep.problems), rep.problems
        assert rep.tensor_core_insns == 0
    # the same kernel without the claim is fine
    rep = _one({**spec, "expect_tensor_cores": False}, "sm_80")
    assert rep.verdict == "OK", rep.problems


def test_huge_tile_is_flagged():
    # 256x256 fp32 accumulator on 4 warps = 512 accumulator registers per thread: spills, and the
    # 4-stage 256x256x128 fp16 pipeline needs ~384 KB of shared memory (> 227 KB on sm_90)
    rep = _one(_toy_spec("toy_huge", 256, 256, 128, warps=4, stages=4), "sm_90")
    assert rep.verdict == "FAIL"
    spilled = bool(rep.spill_stores or rep.spill_loads)
    over = rep.smem_bytes is not None and rep.smem_bytes > rep.smem_limit
    assert spilled or over or not rep.compiled, rep
    if rep.compiled:
        assert any("spill" in p or "shared memory" in p for p in rep.problems)


def test_compile_error_is_a_fail_row():
    bad = _toy_spec("toy_bad_sig", 64, 64, 32)
    bad["signature"] = {k: v for k, v in bad["signature"].items() if k != "M"}
    rep = _one(bad, "sm_80")
    assert not rep.compiled and rep.verdict == "FAIL" and rep.error


def test_cli_exit_code_and_json(capsys, monkeypatch):
    specs = {
        "sm_80": [("toy", _toy_spec("toy_good", 64, 64, 32))],
        "sm_90": [("toy", _toy_spec("toy_fp32", 64, 64, 32, dtype="fp32", precision="ieee"))],
    }
    monkeypatch.setattr(aot, "collect_specs", lambda profile, kernels=None: specs[_arch_of(profile)])
    from portable_xy.cli import main

    assert main(["kernels", "aot-report", "--arch", "sm_80"]) == 0
    out = capsys.readouterr().out
    assert "toy_good" in out and "OK" in out
    assert main(["kernels", "aot-report", "--arch", "sm90", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["reports"][0]["verdict"] == "FAIL"


def _arch_of(profile):
    return "sm_90" if profile.arch == "sm90" else "sm_80"


# ---- the real kernels -----------------------------------------------------------------------
def _real_specs_exist():
    from portable_xy.backends.profile import load_profile

    try:
        return bool(aot.collect_specs(load_profile("cuda", "sm80")))
    except Exception:  # noqa: BLE001 - a broken kernel module must fail the test below, not skip it
        return True


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_real_kernels_ci_verdict(arch):
    if not _real_specs_exist():
        pytest.skip("no kernel module exports aot_specs yet")
    reports = aot.aot_report([arch])
    assert reports
    print("\n" + aot.format_table(reports))
    bad = [(r.kernel, r.config, r.problems) for r in reports if not r.ok]
    assert not bad, bad
    for r in reports:
        assert r.spill_stores == 0 and r.spill_loads == 0
        assert r.smem_bytes <= r.smem_limit
        if r.expect_tensor_cores:
            assert r.tensor_core_insns > 0
