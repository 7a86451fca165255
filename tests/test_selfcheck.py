"""The hardware validation kit's own checks can fail: a kernel that leaves output unwritten or
computes the wrong thing fails its check (and the run goes on); a stage that raises still writes
its JSON. The whole kit runs in CI as ``scripts/device_check.sh --backend interpret --quick``."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@pytest.fixture
def be():
    from portable_xy.backends import get_backend

    return get_backend("interpret")


def _stage(tmp_path):
    from portable_xy.tools.selfcheck.report import Report

    report = Report(tmp_path, {"backend": "interpret"}, budget_s=60)
    return report, report.stage("kernels")


def test_support_checks_pass_then_catch_broken_kernels(be, tmp_path, monkeypatch):
    from portable_xy.tools.selfcheck.kernels import KernelChecks

    report, ctx = _stage(tmp_path)
    with ctx as st:
        KernelChecks(be, st, quick=True).support(torch.float32)
    assert [c.status for c in st.checks] == ["pass"] * 5, [(c.name, c.note) for c in st.checks]

    act, norm = be.k.activation, be.k.rms_norm
    monkeypatch.setattr(act, "silu_and_mul", lambda x, prof, out: out)  # writes nothing: NaN stays
    real = norm.rms_norm
    monkeypatch.setattr(norm, "rms_norm", lambda *a, **k: tuple(None if t is None else t * 1.01 for t in real(*a, **k)))
    report, ctx = _stage(tmp_path / "broken")
    with ctx as st:
        KernelChecks(be, st, quick=True).support(torch.float32)
    got = {c.name: c for c in st.checks}
    assert got["silu_and_mul fp32"].status == "fail" and "unwritten" in got["silu_and_mul fp32"].note
    assert got["rms_norm fp32"].status == "fail" and "elements off" in got["rms_norm fp32"].note
    assert got["rope fp32"].status == "pass"  # the others still ran
    assert report.finish() == 1


def test_gemm_check_catches_a_dropped_bias(be, tmp_path, monkeypatch):
    from portable_xy.tools.selfcheck import kernels

    sg = be.k.smooth_gemm
    real = sg.smooth_gemm
    monkeypatch.setattr(sg, "smooth_gemm", lambda x, w, b, *a, **k: real(x, w, None, *a, **k))
    small = kernels.Sizes(40, 24, (1, 2), (), (4, 2), (32,), 1, 32, 64)
    monkeypatch.setattr(kernels, "sizes", lambda dev, quick: small)
    _, ctx = _stage(tmp_path)
    with ctx as st:
        kernels.KernelChecks(be, st, quick=True).gemm(torch.float32)
    by_m = {c.name.split(" M=")[1].split(" ")[0]: c.status for c in st.checks}
    assert by_m == {"1": "fail", "2": "pass"}  # odd M carries a bias in the check


def test_moe_checks_pass_then_catch_a_dropped_routing_weight(be, tmp_path, monkeypatch):
    from portable_xy.tools.selfcheck import kernels

    small = kernels.Sizes(40, 24, (1,), (), (4, 2), (32,), 1, 32, 64, (4, 2, 64, 32), (1, 9))
    monkeypatch.setattr(kernels, "sizes", lambda dev, quick: small)
    _, ctx = _stage(tmp_path)
    with ctx as st:
        kernels.KernelChecks(be, st, quick=True).moe(torch.float32)
    assert [c.status for c in st.checks] == ["pass"] * 7, [(c.name, c.note) for c in st.checks]
    monkeypatch.setattr(be.k.fused_moe, "_slot_weights", lambda w: torch.ones(w.numel()))
    _, ctx = _stage(tmp_path / "broken")
    with ctx as st:
        kernels.KernelChecks(be, st, quick=True).moe(torch.float32)
    got = {c.name.split(" ")[0]: c.status for c in st.checks}
    assert got["moe_route"] == "pass" and got["fused_moe"] == "fail"
    assert all(c.status == "fail" and "elements off" in c.note for c in st.checks if c.name.startswith("fused_moe"))


def test_a_stage_that_raises_is_a_failed_check_and_still_written(tmp_path):
    from portable_xy.tools.selfcheck.report import Report

    report = Report(tmp_path, {"backend": "interpret"}, budget_s=60)
    with report.stage("environment") as st:
        st.check("first", True)
        raise RuntimeError("boom")
    body = json.loads((tmp_path / "01_environment.json").read_text())
    assert [c["status"] for c in body["checks"]] == ["pass", "fail"] and "boom" in body["checks"][1]["note"]
    assert report.finish() == 1
    assert "FAILED" in (tmp_path / "summary.md").read_text()
