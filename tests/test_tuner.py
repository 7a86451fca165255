"""Offline tuner end to end (dry-run fake timer and the Triton interpreter), the tuned-file header,
its place in the profile precedence, and that stale tuned files are ignored."""

from __future__ import annotations

import warnings

import pytest
import yaml

from portable_xy.backends import profile as prof_mod
from portable_xy.backends.profile import load_profile
from portable_xy.tools import tune as tuner

HEADER = ("device", "triton_version", "triton_package", "kernel_source_hash", "tuned_at", "tuner")


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    d = tmp_path / "tuned"
    monkeypatch.setenv("PORTABLE_XY_PROFILE_DIR", str(d))
    return d


def _quiet(*_a, **_k):
    pass


def _read(path):
    with open(path) as f:
        return yaml.safe_load(f)


def test_dry_run_writes_keyed_profile_at_tuned_location(tuned_dir):
    path = tuner.tune("cuda", dry_run=True, arch="sm90", log=_quiet)
    assert path == tuned_dir / "cuda" / "sm90.yaml"
    doc = _read(path)
    for k in HEADER:
        assert k in doc, k
    assert doc["kernel_source_hash"] == prof_mod.kernel_source_hash()
    pkg, ver = prof_mod.installed_triton()
    assert doc["triton_version"] == ver and doc["triton_package"] == pkg
    assert doc["device"].startswith("dry-run")
    tiles = doc["gemm"]["tiles"]
    assert 1 <= len(tiles) <= len(load_profile("cuda", "sm90", tuned=False).gemm["tiles"])
    assert len({t["BLOCK_K"] for t in tiles}) == 1  # one BLOCK_K per menu (bit-exact rows)
    for t in tiles:
        assert all(t[k] % 16 == 0 for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        assert (t["BLOCK_M"] + t["BLOCK_N"]) * t["BLOCK_K"] * 2 * t["num_stages"] <= 232448
    assert doc["attention"]["kv_tile"] in tuner.KV_TILES["cuda"]


def test_dry_run_is_deterministic(tmp_path):
    a = _read(tuner.tune("npu", dry_run=True, out=tmp_path / "a.yaml", log=_quiet))
    b = _read(tuner.tune("npu", dry_run=True, out=tmp_path / "b.yaml", log=_quiet))
    assert a["gemm"] == b["gemm"] and a["attention"] == b["attention"]
    budget = load_profile("ascend", "910b").data["onchip"]["live_budget_bytes"]
    for t in a["gemm"]["tiles"]:
        live = (t["BLOCK_M"] + t["BLOCK_N"]) * t["BLOCK_K"] * 2 + t["BLOCK_M"] * t["BLOCK_N"] * 4
        assert live <= budget


def test_tuned_file_precedence(tuned_dir):
    shipped = load_profile("cuda", "sm90")
    assert shipped.tuned is None
    tuner.tune("cuda", dry_run=True, arch="sm90", log=_quiet)
    doc = _read(tuned_dir / "cuda" / "sm90.yaml")
    p = load_profile("cuda", "sm90")
    # tuned > arch: the tuned menu replaces the arch file's
    assert p.gemm["tiles"] == doc["gemm"]["tiles"]
    assert p.attention["kv_tile"] == doc["attention"]["kv_tile"]
    assert p.sources[-1] == str(tuned_dir / "cuda" / "sm90.yaml")
    # keys the tuner did not write still come from arch > vendor > default
    assert p.num_cores == 132  # sm90.yaml (cuda/default says 80, default.yaml 1)
    assert p.gemm["group_m"] == shipped.gemm["group_m"]  # cuda/default.yaml
    assert p.data["device"] == shipped.data["device"]  # header "device" is not merged as data
    assert p.tuned["device"] == doc["device"]
    for k in HEADER:
        if k != "device":  # profile data has its own `device` mapping (peaks) from the arch file
            assert k not in p.data
    assert isinstance(p.data["device"], dict)
    # another arch is untouched
    assert load_profile("cuda", "sm80").tuned is None


def _rewrite(path, **changes):
    doc = _read(path)
    doc.update(changes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.mark.parametrize(
    "change",
    [
        {"kernel_source_hash": "sha256:0000000000000000"},
        {"triton_version": "0.0.1"},
        {"triton_package": "not-triton"},
        {"kernel_source_hash": None},
    ],
    ids=["stale-hash", "other-triton", "other-package", "no-hash"],
)
def test_stale_tuned_file_is_ignored(tuned_dir, change):
    path = tuner.tune("cuda", dry_run=True, arch="sm80", log=_quiet)
    _rewrite(path, **change)
    with pytest.warns(UserWarning, match="ignoring stale tuned profile"):
        p = load_profile("cuda", "sm80")
    assert p.tuned is None
    assert str(path) not in p.sources
    assert p.gemm["tiles"] == load_profile("cuda", "sm80", tuned=False).gemm["tiles"]


def test_device_name_mismatch_is_ignored(tuned_dir):
    tuner.tune("cuda", dry_run=True, arch="sm80", device_name="NVIDIA A100-SXM4-80GB", log=_quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_profile("cuda", "sm80", device_name="NVIDIA A100-SXM4-80GB").tuned is not None
    with pytest.warns(UserWarning, match="device"):
        assert load_profile("cuda", "sm80", device_name="NVIDIA A100-PCIE-40GB").tuned is None


def test_kernel_source_hash_tracks_sources(tmp_path, monkeypatch):
    """The hash covers the kernel package; tooling (AOT specs, the tuner) lives outside it."""
    src, tools = tmp_path / "triton_kernels", tmp_path / "tools"
    src.mkdir()
    tools.mkdir()
    (src / "k.py").write_text("x = 1\n")
    (tools / "aot_specs.py").write_text("tooling\n")
    monkeypatch.setattr(prof_mod, "kernel_source_dir", lambda: src)
    h1 = prof_mod.kernel_source_hash()
    (tools / "aot_specs.py").write_text("tooling changed\n")  # tooling does not invalidate tunings
    assert prof_mod.kernel_source_hash() == h1
    (src / "k.py").write_text("x = 2\n")
    assert prof_mod.kernel_source_hash() != h1
    monkeypatch.undo()
    kernels = {p.stem for p in prof_mod.kernel_source_dir().glob("*.py")}
    assert not kernels & {"aot", "aot_specs", "tune", "tuner"}, kernels  # the real layout


def test_choose_menu_prefers_per_problem_best():
    tiles = [dict(BLOCK_M=m, BLOCK_N=64, BLOCK_K=32) for m in (16, 64, 128)]
    tiles.append(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64))
    # 16-row tile best for M=1, 128-row best for M=4096; menus never mix BLOCK_K, so the BK=64
    # tile competes alone (score 3/1 + 6/4) against BK=32 pairs (16 + 128: 1/1 + 4/4 = 2).
    times = {
        "16x64x32": {"1": 1.0, "4096": 9.0},
        "64x64x32": {"1": 2.0, "4096": 5.0},
        "128x64x32": {"1": 4.0, "4096": 4.0},
        "64x64x64": {"1": 3.0, "4096": 6.0},
    }
    menu, score = tuner.choose_menu(tiles, times, menu_size=2)
    assert [tuner.tile_key(t) for t in menu] == ["16x64x32", "128x64x32"]
    assert score == pytest.approx(2.0)
    menu1, _ = tuner.choose_menu(tiles, times, menu_size=1)
    assert len(menu1) == 1


def test_cli_dry_run(tmp_path, capsys):
    from portable_xy.cli import main

    out = tmp_path / "p.yaml"
    assert main(["kernels", "tune", "--backend", "interpret", "--dry-run", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    doc = _read(out)
    assert doc["tuner"]["backend"] == "interpret" and doc["gemm"]["tiles"]


def test_cuda_without_gpu_needs_dry_run(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from portable_xy.cli import main

    assert main(["kernels", "tune", "--backend", "cuda", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "--dry-run" in capsys.readouterr().err


_E2E = """
import sys
import torch
from portable_xy.backends.profile import load_profile
from portable_xy.cli import main

rc = main(["kernels", "tune", "--backend", "interpret", "--shapes", "64x64", "--m-values", "1,20",
           "--menu-size", "2", "--warmup", "0", "--reps", "1", "--no-attention"])
assert rc == 0, rc
from portable_xy.triton_kernels import smooth_gemm as sg  # after the tuner set TRITON_INTERPRET=1
from portable_xy.triton_kernels.gemm_plan import single_tile_plan

p = load_profile("interpret")
assert p.tuned is not None, p.sources
x, w = torch.randn(20, 64), torch.randn(64, 64)
for t in p.gemm["tiles"]:
    y = sg.smooth_gemm(x, w, None, p, single_tile_plan(20, 64, 64, t, p))
    torch.testing.assert_close(y, x @ w.T, rtol=1e-4, atol=1e-4)
print("E2E-OK", p.gemm["tiles"])
"""


def test_interpreter_end_to_end(tuned_dir):
    """Real timing of the SmoothGEMM kernel under the Triton interpreter on tiny shapes, in a fresh
    process (TRITON_INTERPRET must be set before triton is imported); the written profile is the
    one ``load_profile("interpret")`` resolves, and every tuned tile computes the right GEMM."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:  # (no import here: it would fix this process's mode)
        pytest.skip("triton not installed")
    env = dict(os.environ, PORTABLE_XY_PROFILE_DIR=str(tuned_dir))
    env.pop("TRITON_INTERPRET", None)  # the tuner sets it itself before importing triton
    r = subprocess.run([sys.executable, "-c", _E2E], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "E2E-OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    doc = _read(tuned_dir / "interpret" / "default.yaml")
    assert doc["tuner"]["timer"] == "wall clock"
    assert 1 <= len(doc["gemm"]["tiles"]) <= 2
    assert "attention" not in doc  # --no-attention
    # this (pytest) process sees the same tuned file
    assert load_profile("interpret").gemm["tiles"] == doc["gemm"]["tiles"]


def test_interpret_refused_after_compiled_import(monkeypatch):
    import sys

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(sys.modules, "triton", sys.modules.get("triton") or object())
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tuner._enter_interpret_mode()


@pytest.mark.parametrize("backend,soc_or_cc", [("npu", "Ascend910C"), ("npu", "Ascend910_9382"), ("cuda", 89)])
def test_tuned_file_lands_where_the_backend_reads(tuned_dir, backend, soc_or_cc):
    """The tuner names the file by the arch backends/device.py detects, and the backend's profile
    on that device loads it (also for archs without a shipped file, e.g. sm89)."""
    from portable_xy.backends.device import DeviceInfo, ascend_arch, cuda_arch

    arch = ascend_arch(soc_or_cc) if backend == "npu" else cuda_arch(soc_or_cc)
    path = tuner.tune(backend, dry_run=True, arch=arch, attention=False, log=_quiet)
    profile = DeviceInfo(backend, None, "test", arch).profile()
    assert profile.sources[-1] == str(path) and profile.tuned is not None
