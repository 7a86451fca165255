"""AOT AMD compile report (no GPU needed): every real kernel config compiles for gfx942 / gfx90a
(CDNA, MFMA) and gfx1100 (RDNA3, WMMA) with no scratch (no spills), within LDS and with MFMA / WMMA
where its spec expects tensor cores; and the checker really flags bad configs (LDS overflow,
spills, a tensor-core claim without matrix instructions, a compile error).

Triton's HIP backend builds hsaco on a CPU-only machine; the report reads the amdgcn assembly.
Compilation runs in subprocesses without TRITON_INTERPRET (see tests/test_aot.py). The real run
(every kernel module, three archs) takes about 2.5 minutes on 2 cores; the toy run about 30 s."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest
from test_aot import _cli as _cuda_cli  # the shared subprocess runner

_spec = importlib.util.find_spec("triton")
if _spec is None or not (Path(_spec.origin).parent / "backends" / "amd").is_dir():
    pytest.skip("needs upstream triton with its AMD (HIP) backend", allow_module_level=True)

ROCM_ARCHS = ("gfx942", "gfx90a", "gfx1100")
MATRIX_INSN = {"gfx942": "v_mfma", "gfx90a": "v_mfma", "gfx1100": "v_wmma"}
LDS_LIMIT = 65536

# Kernels whose configs exercise every HIP verdict. Written to a file and imported by the compile
# subprocess. (Measured with Triton 3.9; the comments say what each config does on each arch.)
TOY_MODULE = textwrap.dedent(
    """
    import triton
    import triton.language as tl


    @triton.jit
    def toy_gemm(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rm[:, None] * stride_am + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
            b = tl.load(b_ptr + (k + rk)[:, None] * stride_bk + rn[None, :], mask=rn[None, :] < N, other=0.0)
            acc = tl.dot(a, b, acc)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc, mask=mask)


    @triton.jit
    def toy_softmax(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        e = tl.exp(x - tl.max(x, 0))
        tl.store(y_ptr + offs, e / tl.sum(e, 0))


    def gemm(name, bm, bn, bk, dtype="fp16", warps=4, stages=2, expect=True):
        sig = {"a_ptr": "*" + dtype, "b_ptr": "*" + dtype, "c_ptr": "*fp32"}
        sig.update({k: "i32" for k in ("M", "N", "K", "stride_am", "stride_bk", "stride_cm")})
        return {
            "name": name, "fn": toy_gemm, "signature": sig,
            "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
            "num_warps": warps, "num_stages": stages, "expect_tensor_cores": expect,
            "divisible_by_16": ["K", "stride_am", "stride_bk", "stride_cm"],
        }


    def aot_specs(profile):
        bad_sig = gemm("toy_bad_sig", 64, 64, 32)
        del bad_sig["signature"]["M"]
        return [
            # fp16 64 x 64 x 32, 4 waves: MFMA / WMMA, no scratch, 8 KB of LDS
            gemm("toy_good", 64, 64, 32),
            # fp32 dot: CDNA has fp32 MFMA (v_mfma_f32_*_f32), RDNA3 has no fp32 WMMA (vector FMAs)
            gemm("toy_fp32", 32, 32, 32, dtype="fp32"),
            # no dot at all: a tensor-core claim must fail everywhere; without the claim it is fine
            {"name": "toy_no_dot", "fn": toy_softmax, "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32"},
             "constexprs": {"BLOCK": 1024}, "num_warps": 4, "num_stages": 1, "expect_tensor_cores": True},
            {"name": "toy_no_dot_honest", "fn": toy_softmax, "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32"},
             "constexprs": {"BLOCK": 1024}, "num_warps": 4, "num_stages": 1, "expect_tensor_cores": False},
            # 3 stages of 128 x 128 x 128 fp16 tiles: 96 KB (CDNA) / 128 KB (gfx1100) of LDS > 64 KB
            gemm("toy_lds", 128, 128, 128, warps=8, stages=3),
            # a 128 x 256 fp32 accumulator on one wave: VGPRs (and AGPRs on CDNA) spill to scratch
            gemm("toy_spill", 128, 256, 16, warps=1, stages=1),
            bad_sig,
        ]
    """
)


def _cli(tmp_path, *args):
    """``kernels aot-report ARGS`` in a subprocess (test_aot.py's runner; three archs take longer)."""
    return _cuda_cli(tmp_path, *args, timeout=900)


def _arch_args() -> list[str]:
    return [x for a in ROCM_ARCHS for x in ("--arch", a)]


def test_arch_names():
    from portable_xy.tools import aot

    assert set(aot.ARCHS) == {"sm_80", "sm_90", *ROCM_ARCHS}
    for raw, want in (("sm_80", "sm_80"), ("sm80", "sm_80"), ("90", "sm_90"), ("SM_90", "sm_90"),
                      ("gfx942", "gfx942"), ("GFX90A", "gfx90a"), ("gfx1100", "gfx1100")):  # fmt: skip
        assert aot.normalize_arch(raw) == want
    for bad in ("sm_86", "gfx950", "942", ""):
        with pytest.raises(ValueError, match="unsupported arch"):
            aot.normalize_arch(bad)
    assert aot.DEFAULT_ARCHS == ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """``{(arch, name): report dict}`` for the toy specs on the three archs, one subprocess."""
    d = tmp_path_factory.mktemp("aot_rocm_toy")
    (d / "toy_specs.py").write_text(TOY_MODULE)
    r = _cli(d, "--json", *_arch_args(), "--specs", str(d / "toy_specs.py"))
    assert r.returncode == 1, r.stderr[-3000:]  # some toy configs are bad on purpose
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    return {(x["arch"], x["kernel"]): x for x in doc["reports"]}


@pytest.mark.parametrize("arch", ROCM_ARCHS)
def test_good_gemm_passes(toy, arch):
    rep = toy[(arch, "toy_good")]
    assert rep["compiled"], rep["error"]
    assert rep["verdict"] == "OK", rep["problems"]
    assert rep["vendor"] == "rocm" and rep["matrix_insn"] == MATRIX_INSN[arch]
    assert rep["isa_counts"][MATRIX_INSN[arch]] > 0 and rep["tensor_core_insns"] > 0
    other = "v_wmma" if MATRIX_INSN[arch] == "v_mfma" else "v_mfma"
    assert rep["isa_counts"][other] == 0
    assert rep["scratch_bytes"] == 0 and rep["vgpr_spills"] == 0 and rep["sgpr_spills"] == 0
    assert 0 < rep["smem_bytes"] <= rep["smem_limit"] == LDS_LIMIT
    assert 0 < rep["vgprs"] <= 512 and 0 < rep["sgprs"] <= 106
    assert rep["occupancy"] >= 1


@pytest.mark.parametrize("arch", ROCM_ARCHS)
def test_fp32_dot(toy, arch):
    """fp32 inputs: CDNA runs the dot on fp32 MFMA (accepted); RDNA3 has no fp32 WMMA (FAIL)."""
    rep = toy[(arch, "toy_fp32")]
    assert rep["compiled"], rep["error"]
    if MATRIX_INSN[arch] == "v_mfma":
        assert rep["verdict"] == "OK", rep["problems"]
        assert rep["isa_counts"]["v_mfma"] > 0
    else:
        assert rep["verdict"] == "FAIL"
        assert rep["tensor_core_insns"] == 0 and rep["isa_counts"]["v_wmma"] == 0
        assert any("expected v_wmma" in p for p in rep["problems"]), rep["problems"]


@pytest.mark.parametrize("arch", ROCM_ARCHS)
def test_tensor_core_claim_without_dot_fails(toy, arch):
    rep = toy[(arch, "toy_no_dot")]
    assert rep["compiled"], rep["error"]
    assert rep["verdict"] == "FAIL" and rep["tensor_core_insns"] == 0
    assert rep["problems"] == [f"expected {MATRIX_INSN[arch]} on {arch} but the ISA has none"], rep["problems"]
    honest = toy[(arch, "toy_no_dot_honest")]
    assert honest["verdict"] == "OK", honest["problems"]


@pytest.mark.parametrize("arch", ROCM_ARCHS)
def test_lds_overflow_is_flagged(toy, arch):
    rep = toy[(arch, "toy_lds")]
    assert rep["compiled"], rep["error"]
    assert rep["verdict"] == "FAIL"
    assert rep["smem_bytes"] > rep["smem_limit"] == LDS_LIMIT
    assert any(p.startswith(f"LDS {rep['smem_bytes']} B > {LDS_LIMIT} B") for p in rep["problems"]), rep["problems"]


@pytest.mark.parametrize("arch", ROCM_ARCHS)
def test_spills_are_flagged(toy, arch):
    rep = toy[(arch, "toy_spill")]
    assert rep["compiled"], rep["error"]
    assert rep["verdict"] == "FAIL"
    assert rep["scratch_bytes"] > 0 and rep["vgpr_spills"] > 0
    c = rep["isa_counts"]
    assert c["scratch_store"] + c["buffer_store_scratch"] > 0 and c["scratch_load"] + c["buffer_load_scratch"] > 0
    assert any(p.startswith("scratch") for p in rep["problems"]), rep["problems"]


def test_compile_error_is_a_fail_row(toy):
    rep = toy[("gfx942", "toy_bad_sig")]
    assert not rep["compiled"] and rep["verdict"] == "FAIL" and rep["error"]


def test_cli_table_and_exit_codes(tmp_path):
    (tmp_path / "toy_specs.py").write_text(TOY_MODULE)
    good = _cli(tmp_path, "--arch", "gfx942", "--specs", str(tmp_path / "toy_specs.py"), "--kernels", "toy_good")
    assert good.returncode == 0, good.stdout + good.stderr[-2000:]
    assert "toy_good" in good.stdout and "v_mfma" in good.stdout and "1 configs: 1 pass" in good.stdout
    bad = _cli(tmp_path, "--arch", "gfx1100", "--specs", str(tmp_path / "toy_specs.py"), "--kernels", "toy_fp32")
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout and "expected v_wmma" in bad.stdout
    unknown = _cli(tmp_path, "--arch", "gfx950")
    assert unknown.returncode == 2 and "unsupported arch 'gfx950'" in unknown.stderr


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The ``--json`` report of every kernel module's specs under the shipped ROCm profiles for
    the three archs (one compile subprocess, shared by the tests below)."""
    return _cli(tmp_path_factory.mktemp("aot_rocm_real"), "--json", *_arch_args())


def test_real_kernels_ci_verdict(real):
    """Every kernel module's aot_specs under the shipped ROCm profiles: every config OK on
    gfx942, gfx90a and gfx1100."""
    from portable_xy.backends.profile import load_profile

    r = real
    assert r.stdout, r.stderr[-3000:]
    reports = json.loads(r.stdout)["reports"]
    bad = [(x["arch"], x["kernel"], x["config"], x["problems"]) for x in reports if x["verdict"] != "OK"]
    assert not bad, bad
    assert r.returncode == 0
    assert {x["arch"] for x in reports} == set(ROCM_ARCHS)
    counts = {a: sum(x["arch"] == a for x in reports) for a in ROCM_ARCHS}
    assert len(set(counts.values())) == 1 and counts["gfx942"] > 40, counts  # same specs on every arch
    for x in reports:
        assert x["compiled"] and x["vendor"] == "rocm"
        assert x["scratch_bytes"] == 0 and x["vgpr_spills"] == 0 and x["sgpr_spills"] == 0, x
        lds = load_profile("rocm", x["arch"], tuned=False).data["device"]["lds_bytes"]
        assert x["smem_limit"] == lds and x["smem_bytes"] <= lds
        assert x["occupancy"] >= 1
        if x["expect_tensor_cores"]:
            want = MATRIX_INSN[x["arch"]]
            assert x["matrix_insn"] == want and x["isa_counts"][want] > 0, (x["arch"], x["kernel"])
            assert x["tensor_core_insns"] == x["isa_counts"][want]


def test_real_tree_verify_attention_compiles(real):
    """The tree-mask Meta-Attention configs (which Triton's AMD pipeline rejects with
    num_stages=2) are in the report, compiled and clean on every arch."""
    assert real.stdout, real.stderr[-3000:]
    rows = [x for x in json.loads(real.stdout)["reports"] if x["kernel"].endswith("_tree")]
    want = {f"meta_attention_{ty}_d{d}_tree" for ty in ("fp16", "bf16") for d in (64, 128)}
    for arch in ROCM_ARCHS:
        assert {x["kernel"] for x in rows if x["arch"] == arch} == want
    for x in rows:
        assert x["compiled"] and x["verdict"] == "OK" and "HAS_TREE" in x["config"], x
