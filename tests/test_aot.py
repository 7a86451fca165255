"""AOT CUDA compile report (no GPU needed): every real kernel config compiles for sm_80 and sm_90
without spills, within shared memory and with tensor cores where its spec expects them; and the
checker really flags bad configs (spills, shared memory overflow, missing tensor cores).

Compilation runs in subprocesses without TRITON_INTERPRET: Triton creates its own @jit helpers
when it is first imported, so one process cannot both interpret kernels (the CPU test backends)
and compile them for CUDA. Nothing is cached across runs (aot uses a fresh Triton cache dir)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_spec = importlib.util.find_spec("triton")
if _spec is None or not (Path(_spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
    pytest.skip("needs upstream triton with its bundled NVIDIA tools (cuobjdump)", allow_module_level=True)

# A small GEMM whose configs exercise every verdict. Written to a file and imported by the
# compile subprocess.
TOY_MODULE = textwrap.dedent(
    """
    import triton
    import triton.language as tl


    @triton.jit
    def toy_gemm(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
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
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc, mask=mask)


    def spec(name, bm, bn, bk, dtype="fp16", warps=4, stages=3, precision="tf32", expect=True):
        sig = {"a_ptr": "*" + dtype, "b_ptr": "*" + dtype, "c_ptr": "*fp32"}
        sig.update({k: "i32" for k in ("M", "N", "K", "stride_am", "stride_bk", "stride_cm")})
        return {
            "name": name, "fn": toy_gemm, "signature": sig,
            "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PRECISION": precision},
            "num_warps": warps, "num_stages": stages, "expect_tensor_cores": expect,
            "divisible_by_16": ["K", "stride_am", "stride_bk", "stride_cm"],
        }


    def aot_specs(profile):
        bad_sig = spec("toy_bad_sig", 64, 64, 32)
        del bad_sig["signature"]["M"]
        return [
            spec("toy_good", 64, 64, 32),
            # 16-row (decode) tile: wgmma needs M tiles that are multiples of 64, so HMMA on sm_90
            spec("toy_decode", 16, 64, 64),
            # fp32 dot at IEEE precision runs on FFMA: the tensor-core claim must fail
            spec("toy_fp32", 64, 64, 32, dtype="fp32", precision="ieee", expect=True),
            spec("toy_fp32_honest", 64, 64, 32, dtype="fp32", precision="ieee", expect=False),
            # 256x256 fp32 accumulator on 4 warps (512 registers/thread) with a 4-stage
            # 256x256x128 fp16 pipeline (~256 KB of shared memory): spills and overflows smem
            spec("toy_huge", 256, 256, 128, warps=4, stages=4),
            bad_sig,
        ]
    """
)


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PORTABLE_XY_PROFILE_DIR"] = str(tmp_path / "tuned")  # judge the shipped profiles only
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _cli(tmp_path, *args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "portable_xy.cli", "kernels", "aot-report", *args],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """``{(arch, name): report dict}`` for the toy specs, compiled in one subprocess."""
    d = tmp_path_factory.mktemp("aot_toy")
    (d / "toy_specs.py").write_text(TOY_MODULE)
    r = _cli(d, "--json", "--specs", str(d / "toy_specs.py"))
    assert r.returncode == 1, r.stderr[-3000:]  # some toy configs are bad on purpose
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    return {(x["arch"], x["kernel"]): x for x in doc["reports"]}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_good_gemm_passes(toy, arch):
    rep = toy[(arch, "toy_good")]
    assert rep["compiled"], rep["error"]
    assert rep["verdict"] in ("OK", "WARN"), rep["problems"]
    assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0
    assert 0 < rep["smem_bytes"] <= rep["smem_limit"]
    assert 0 < rep["registers"] <= 255
    if arch == "sm_90":
        assert rep["sass_counts"]["HGMMA"] > 0  # 64-row tile, 4 warps: wgmma
    else:
        assert rep["sass_counts"]["HMMA"] > 0
    assert rep["smem_limit"] == {"sm_80": 166912, "sm_90": 232448}[arch]


def test_small_m_tile_on_sm90_accepts_mma_sync(toy):
    rep = toy[("sm_90", "toy_decode")]
    assert rep["verdict"] in ("OK", "WARN"), rep["problems"]
    assert rep["sass_counts"]["HGMMA"] == 0 and rep["sass_counts"]["HMMA"] > 0
    assert rep["wgmma_applicable"] is False and rep["dot_m_tiles"] == [16]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_fp32_ieee_dot_misses_tensor_cores(toy, arch):
    rep = toy[(arch, "toy_fp32")]
    assert rep["compiled"], rep["error"]
    assert rep["verdict"] == "FAIL"
    assert rep["tensor_core_insns"] == 0
    assert any("tensor cores" in p or "HGMMA" in p for p in rep["problems"]), rep["problems"]
    # the same kernel without the claim is fine
    assert toy[(arch, "toy_fp32_honest")]["verdict"] == "OK", toy[(arch, "toy_fp32_honest")]["problems"]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_huge_tile_is_flagged(toy, arch):
    rep = toy[(arch, "toy_huge")]
    assert rep["verdict"] == "FAIL"
    assert rep["compiled"], rep["error"]
    assert rep["smem_bytes"] > rep["smem_limit"]
    assert rep["spill_stores"] > 0 and rep["spill_loads"] > 0
    assert any("spill" in p for p in rep["problems"]) and any("shared memory" in p for p in rep["problems"])


def test_compile_error_is_a_fail_row(toy):
    rep = toy[("sm_80", "toy_bad_sig")]
    assert not rep["compiled"] and rep["verdict"] == "FAIL" and rep["error"]


def test_cli_table_and_exit_codes(tmp_path):
    (tmp_path / "toy_specs.py").write_text(TOY_MODULE)
    good = _cli(tmp_path, "--arch", "sm80", "--specs", str(tmp_path / "toy_specs.py"), "--kernels", "toy_good")
    assert good.returncode == 0, good.stdout + good.stderr[-2000:]
    assert "toy_good" in good.stdout and "OK" in good.stdout and "1 configs: 1 pass" in good.stdout
    bad = _cli(tmp_path, "--arch", "sm_90", "--specs", str(tmp_path / "toy_specs.py"), "--kernels", "toy_fp32")
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The ``--json`` report run of every kernel module's specs under the shipped CUDA profiles
    (one compile subprocess, shared by the tests below)."""
    return _cli(tmp_path_factory.mktemp("aot_real"), "--json")


def test_real_kernels_ci_verdict(real):
    """Every kernel module's aot_specs under the shipped CUDA profiles: green for sm_80 and sm_90."""
    r = real
    if r.returncode != 0 and "no kernel exports aot_specs" in r.stderr:
        pytest.skip("no kernel module exports aot_specs yet")
    assert r.stdout, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    reports = doc["reports"]
    bad = [(x["arch"], x["kernel"], x["config"], x["problems"]) for x in reports if x["verdict"] == "FAIL"]
    assert not bad, bad
    assert r.returncode == 0
    assert {x["arch"] for x in reports} == {"sm_80", "sm_90"}
    for x in reports:
        assert x["spill_stores"] == 0 and x["spill_loads"] == 0
        assert x["smem_bytes"] <= x["smem_limit"]
        if x["expect_tensor_cores"]:
            assert x["tensor_core_insns"] > 0


def test_quant_gemm_compiles_clean_with_tensor_cores(real):
    """The weight-only quantized GEMM (tiled menu, split-K small-M tile, 4 and 8 bits, fp16 and
    bf16): no spills, and tensor cores -- HGMMA on sm_90 for tiles with BLOCK_M >= 64, HMMA for
    16-row tiles and on sm_80."""
    from portable_xy.backends.profile import load_profile

    assert real.stdout, real.stderr[-3000:]
    rows = [x for x in json.loads(real.stdout)["reports"] if x["module"] == "quant_gemm"]
    for arch in ("sm_80", "sm_90"):
        q = load_profile("cuda", arch.replace("_", ""), tuned=False).data["quant_gemm"]
        tiles = [f"{t['BLOCK_M']}x{t['BLOCK_N']}x{t['BLOCK_K']}" for t in q["tiles"]]
        st = q["small_m"]["tile"]
        want = {f"quant_gemm_w{b}_{ty}_{t}" for b in (4, 8) for ty in ("fp16", "bf16") for t in tiles}
        want |= {f"quant_gemm_w{b}_{ty}_{st['BLOCK_M']}x{st['BLOCK_N']}x{st['BLOCK_K']}_splitk"
                 for b in (4, 8) for ty in ("fp16", "bf16")}  # fmt: skip
        want |= {"split_k_reduce_fp16", "split_k_reduce_bf16"}
        assert {x["kernel"] for x in rows if x["arch"] == arch} == want, q
    for x in rows:
        assert x["verdict"] == "OK", (x["arch"], x["kernel"], x["problems"], x["warnings"])
        assert x["spill_stores"] == 0 and x["spill_loads"] == 0 and x["smem_bytes"] <= x["smem_limit"]
        if x["kernel"].startswith("split_k_reduce"):
            continue
        bm = int(re.search(r"BLOCK_M=(\d+)", x["config"]).group(1))
        tc = x["sass_counts"]
        if x["arch"] == "sm_90" and bm >= 64:
            assert tc["HGMMA"] > 0, x["kernel"]
        else:
            assert tc["HMMA"] > 0, (x["arch"], x["kernel"])


def test_fused_moe_compiles_clean_with_tensor_cores(real):
    """The fused-MoE kernels (grouped GEMM gate-up / down over the gemm menu, quantized grouped GEMM
    over the quant menu for 4 and 8 bits, combine, routing; fp16 and bf16): every spec compiled,
    no spills, and tensor cores -- HGMMA on sm_90 for tiles with BLOCK_M >= 64, HMMA otherwise."""
    from portable_xy.backends.profile import load_profile
    from portable_xy.tools import aot_specs

    assert real.stdout, real.stderr[-3000:]
    rows = [x for x in json.loads(real.stdout)["reports"] if x["module"] == "fused_moe"]
    for arch in ("sm_80", "sm_90"):
        want = {s["name"] for s in aot_specs.fused_moe(load_profile("cuda", arch.replace("_", ""), tuned=False))}
        assert {x["kernel"] for x in rows if x["arch"] == arch} == want
    for x in rows:
        assert x["verdict"] == "OK", (x["arch"], x["kernel"], x["problems"], x["warnings"])
        assert x["spill_stores"] == 0 and x["spill_loads"] == 0 and x["smem_bytes"] <= x["smem_limit"]
        if not x["kernel"].startswith(("moe_gemm", "moe_quant_gemm")):
            continue
        bm = int(re.search(r"BLOCK_M=(\d+)", x["config"]).group(1))
        tc = x["sass_counts"]
        if x["arch"] == "sm_90" and bm >= 64:
            assert tc["HGMMA"] > 0, x["kernel"]
        else:
            assert tc["HMMA"] > 0, (x["arch"], x["kernel"])


def test_interpret_mode_process_is_refused(tmp_path):
    """In a process whose triton was imported under TRITON_INTERPRET=1 the report refuses clearly."""
    code = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import triton\n"
        "from portable_xy.tools import aot\n"
        "try:\n"
        "    aot.aot_report(['sm_80'], specs=lambda p: [])\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert "refused: aot-report needs a process" in r.stdout, r.stdout + r.stderr[-2000:]
