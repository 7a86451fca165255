"""Backend profiles: precedence (default < vendor < arch < tuned), every shipped profile loads and is
well formed, on-chip budgets, and the unknown-vendor error.

On-chip estimates used here
    CUDA shared memory of a pipelined GEMM tile: ``(BM + BN) * BK * 2 B * num_stages`` (fp16/bf16
    operand tiles, one copy per pipeline stage; the accumulator lives in registers) must stay within
    the arch's opt-in maximum per block: sm80 166912 B, sm90 232448 B, anything else (sm86/sm89
    class) 101376 B. The AOT report (tests/test_aot.py) checks the real compiled numbers.

    Ascend unified buffer (UB, 192 KB per AI core on 910B/910_93): the GEMM tiles live at once are
    A ``BM x BK`` and B ``BK x BN`` in the input dtype (2 B for fp16/bf16) plus the fp32 accumulator
    C ``BM x BN`` (4 B): ``live = (BM*BK + BK*BN) * 2 + BM*BN*4``. triton-ascend double-buffers
    live tensors by default (``multibuffer``), so the physical footprint is ``2 * live``, which must
    fit the 192 KB UB, i.e. ``live <= 96 KB`` (the documented "<= 96 KB with double-buffering"
    rule). This is conservative for a cube kernel (A/B actually stage through L1/L0A/L0B and C
    accumulates in L0C before the epilogue moves it through UB). fp32 inputs double A and B; the
    shipped Ascend menu is sized for half precision (see test_ascend_gemm_tiles_fp32_note).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from portable_xy.backends import profile as prof_mod
from portable_xy.backends.profile import PROFILE_DIR, load_profile

SMEM_LIMIT = {"sm80": 166912, "sm90": 232448}
SMEM_LIMIT_OTHER = 101376
UB_LIVE_BUDGET = 96 * 1024


@pytest.fixture(autouse=True)
def _no_tuned(tmp_path, monkeypatch):
    monkeypatch.setenv("PORTABLE_XY_PROFILE_DIR", str(tmp_path / "tuned"))


def shipped_profiles() -> list[tuple[str, str | None]]:
    """(vendor, arch) for every shipped profile file (arch None = the vendor's own defaults)."""
    out = []
    for p in sorted(PROFILE_DIR.iterdir()):
        if p.is_dir():
            out.append((p.name, None))
            out += [(p.name, f.stem) for f in sorted(p.glob("*.yaml")) if f.stem != "default"]
        elif p.suffix == ".yaml" and p.stem != "default":
            out.append((p.stem, None))
    return out


SHIPPED = shipped_profiles()


def test_shipped_profile_list():
    vendors = {v for v, _ in SHIPPED}
    assert {"cpu", "interpret", "cuda", "ascend"} <= vendors
    assert ("cuda", "sm80") in SHIPPED and ("cuda", "sm90") in SHIPPED
    assert ("ascend", "910b") in SHIPPED


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@pytest.mark.parametrize("vendor,arch", SHIPPED, ids=[f"{v}-{a or 'default'}" for v, a in SHIPPED])
def test_shipped_profile_is_well_formed(vendor, arch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = load_profile(vendor, arch)
    # every layer file parses to a mapping and is actually used
    assert p.sources[0] == str(PROFILE_DIR / "default.yaml")
    if arch:
        assert p.sources[-1] == str(PROFILE_DIR / vendor / f"{arch}.yaml")
    for src in p.sources:
        assert isinstance(yaml.safe_load(Path(src).read_text()), dict)
    assert p.kv_block_size > 0 and p.kv_block_size % 16 == 0
    assert p.chunk_align > 0 and p.chunk_align % 16 == 0
    assert p.num_cores >= 1
    assert p.data["num_cores_from"] in ("fixed", "sm_count", "num_aicore", "cpu_threads")
    att = p.attention
    assert att["q_tiles"] == sorted(att["q_tiles"]) and att["q_tiles"]
    for q in att["q_tiles"]:
        assert q % 16 == 0 and _pow2(q), q
    assert att["kv_tile"] % 16 == 0 and _pow2(att["kv_tile"])
    assert p.kv_block_size % att["kv_tile"] == 0 or att["kv_tile"] % p.kv_block_size == 0
    tiles = p.gemm["tiles"]
    assert tiles, "empty GEMM menu"
    for t in tiles:
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert isinstance(t[k], int) and t[k] % 16 == 0 and _pow2(t[k]), (k, t)
    assert len({t["BLOCK_K"] for t in tiles}) == 1, "one BLOCK_K per menu (bit-exact rows across plans)"
    assert len({(t["BLOCK_M"], t["BLOCK_N"]) for t in tiles}) == len(tiles), "duplicate tiles"
    dev = p.data.get("device")
    if dev is not None:
        assert isinstance(dev, dict) and dev["peak_gbps"] > 0
        assert all(v > 0 for v in dev["peak_tflops"].values())


@pytest.mark.parametrize("arch", [a for v, a in SHIPPED if v == "cuda"])
def test_cuda_tiles_fit_shared_memory(arch):
    p = load_profile("cuda", arch)
    limit = SMEM_LIMIT.get(arch or "", SMEM_LIMIT_OTHER)
    for t in p.gemm["tiles"]:
        assert t["num_warps"] in (1, 2, 4, 8, 16) and t["num_stages"] >= 1, t
        smem = (t["BLOCK_M"] + t["BLOCK_N"]) * t["BLOCK_K"] * 2 * t["num_stages"]
        assert smem <= limit, f"{t}: ~{smem} B of shared memory > {limit} B ({arch or 'generic'})"
        acc_regs = t["BLOCK_M"] * t["BLOCK_N"] // (32 * t["num_warps"])
        assert acc_regs <= 128, f"{t}: {acc_regs} fp32 accumulator registers per thread"


def ub_live_bytes(t: dict, elem_bytes: int = 2) -> int:
    """Live on-chip bytes of one GEMM tile step: A + B in the input dtype + the fp32 C tile."""
    bm, bn, bk = t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_K"]
    return (bm * bk + bk * bn) * elem_bytes + bm * bn * 4


@pytest.mark.parametrize("arch", [a for v, a in SHIPPED if v == "ascend"])
def test_ascend_gemm_tiles_fit_unified_buffer(arch):
    p = load_profile("ascend", arch)
    onchip = p.data["onchip"]
    assert onchip["live_budget_bytes"] <= UB_LIVE_BUDGET  # the profile may be stricter, not looser
    assert 2 * onchip["live_budget_bytes"] <= onchip["ub_bytes"]  # double-buffered copy fits the UB
    for t in p.gemm["tiles"]:
        live = ub_live_bytes(t, 2)
        assert 2 * live <= onchip["ub_bytes"] and live <= onchip["live_budget_bytes"], (
            f"{t}: {live} live bytes (x2 double-buffered) > budget {onchip['live_budget_bytes']}"
        )
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert t[k] % onchip.get("align_elems", 16) == 0
        assert "num_warps" not in t and "num_stages" not in t  # no such options on Ascend


def test_ascend_gemm_tiles_fp32_note():
    """fp32 operands double A and B: which shipped Ascend tiles would still fit. At least one must
    (fp32 models fall back to it); the others are half-precision-only by this estimate."""
    p = load_profile("ascend", "910b")
    fits = [t for t in p.gemm["tiles"] if ub_live_bytes(t, 4) <= UB_LIVE_BUDGET]
    assert fits, "no Ascend GEMM tile fits the UB budget with fp32 operands"


@pytest.mark.parametrize("arch", [a for v, a in SHIPPED if v == "ascend"])
def test_ascend_attention_tiles_fit_unified_buffer_head_dim_64(arch):
    """Meta-Attention live tiles per step: Q (BM x D), K and V (BN x D) in fp16, scores/probs
    (BM x BN) and the output accumulator (BM x D) in fp32, at head_dim 64. (At head_dim 128 the
    128-row query tile needs ~160 KB: the kernel must slice its accumulator or cap the q tile.)"""
    p = load_profile("ascend", arch)
    d, bn = 64, p.attention["kv_tile"]
    for bm in p.attention["q_tiles"]:
        live = (bm * d + 2 * bn * d) * 2 + bm * bn * 4 + bm * d * 4
        assert live <= UB_LIVE_BUDGET, f"q_tile {bm} x kv_tile {bn} at D={d}: {live} B"


# ---- precedence -------------------------------------------------------------------------------
def test_precedence_on_shipped_files():
    base = yaml.safe_load((PROFILE_DIR / "default.yaml").read_text())
    vend = yaml.safe_load((PROFILE_DIR / "cuda" / "default.yaml").read_text())
    arch = yaml.safe_load((PROFILE_DIR / "cuda" / "sm90.yaml").read_text())
    assert load_profile("cuda", "sm90").num_cores == arch["num_cores"]  # arch > vendor
    assert load_profile("cuda").num_cores == vend["num_cores"]  # vendor > default
    assert base["num_cores"] != vend["num_cores"] != arch["num_cores"]
    # an arch without its own file resolves to the vendor defaults
    p = load_profile("cuda", "sm75")
    assert p.num_cores == vend["num_cores"] and p.gemm["tiles"] == vend["gemm"]["tiles"]
    assert not any(s.endswith("sm75.yaml") for s in p.sources)


def test_quant_gemm_section_precedence():
    """``quant_gemm`` (the weight-only quantized GEMM's menu) layers like ``gemm``: the tile list is
    replaced by the most specific file, ``small_m`` merges key by key."""
    base = yaml.safe_load((PROFILE_DIR / "default.yaml").read_text())["quant_gemm"]
    vend = yaml.safe_load((PROFILE_DIR / "cuda" / "default.yaml").read_text())["quant_gemm"]
    arch = yaml.safe_load((PROFILE_DIR / "cuda" / "sm90.yaml").read_text())["quant_gemm"]
    q = load_profile("cuda", "sm90").data["quant_gemm"]
    assert q["tiles"] == arch["tiles"] != vend["tiles"]
    assert q["small_m"]["tile"] == arch["small_m"]["tile"] and q["small_m"]["waves"] == vend["small_m"]["waves"]
    assert load_profile("cuda", "sm75").data["quant_gemm"]["tiles"] == vend["tiles"]
    assert load_profile("cpu").data["quant_gemm"] == base
    for vendor, arch_name in SHIPPED:
        tiles = load_profile(vendor, arch_name).data["quant_gemm"]["tiles"]
        assert tiles and len({t["BLOCK_K"] for t in tiles}) == 1 and all(t["BLOCK_K"] % 32 == 0 for t in tiles)


@pytest.fixture
def fake_tree(tmp_path, monkeypatch):
    root = tmp_path / "profiles"
    (root / "acme").mkdir(parents=True)
    (root / "default.yaml").write_text(
        "kv_block_size: 16\nchunk_align: 16\nnum_cores: 1\n"
        "attention: {q_tiles: [16, 32], kv_tile: 32, split_kv: {max_seqs: 0, num_splits: 1}}\n"
        "gemm: {tiles: [{BLOCK_M: 16, BLOCK_N: 16, BLOCK_K: 16}], group_m: 1}\n"
        "who: default\n"
    )
    (root / "acme" / "default.yaml").write_text("num_cores: 8\nattention: {kv_tile: 64}\nwho: vendor\n")
    (root / "acme" / "x1.yaml").write_text(
        "num_cores: 16\ngemm: {tiles: [{BLOCK_M: 32, BLOCK_N: 32, BLOCK_K: 32}]}\nwho: arch\n"
    )
    (root / "solo.yaml").write_text("who: solo\nnum_cores: 3\n")
    monkeypatch.setattr(prof_mod, "PROFILE_DIR", root)
    return root


@pytest.mark.parametrize("installed,who,kv_tile", [("3.6.0", "old triton", 16), ("3.9.0", "arch", 64),
                                                     (None, "arch", 64)])  # fmt: skip
def test_triton_versions_sections(fake_tree, monkeypatch, installed, who, kv_tile):
    """``triton_versions`` entries apply only where the installed Triton matches, over the rest of
    their own file and under the files above it."""
    (fake_tree / "acme" / "x1.yaml").write_text(
        "who: arch\ntriton_versions:\n  '>=3.2,<3.9': {who: old triton, attention: {kv_tile: 16}}\n"
        "  '>=4.0': {who: future}\n"
    )
    monkeypatch.setattr(prof_mod, "installed_triton", lambda: ("triton", installed))
    p = load_profile("acme", "x1", tuned=False)
    assert p.data["who"] == who and p.attention["kv_tile"] == kv_tile and "triton_versions" not in p.data
    assert p.attention["q_tiles"] == [16, 32]  # the rest still merges deeply
    assert p.triton_overrides == ([f"{fake_tree / 'acme' / 'x1.yaml'}: triton >=3.2,<3.9"] if who != "arch" else [])
    assert p.sources[-1] == str(fake_tree / "acme" / "x1.yaml")


def test_triton_versions_errors(fake_tree, monkeypatch):
    monkeypatch.setattr(prof_mod, "installed_triton", lambda: ("triton", "3.6.0"))
    (fake_tree / "acme" / "x1.yaml").write_text("triton_versions: {'3.6': {who: x}}\n")
    with pytest.raises(ValueError, match="each clause needs one of"):
        load_profile("acme", "x1", tuned=False)
    (fake_tree / "acme" / "x1.yaml").write_text("triton_versions: [1, 2]\n")
    with pytest.raises(ValueError, match="x1.yaml: triton_versions must map"):
        load_profile("acme", "x1", tuned=False)


def test_version_matches():
    from portable_xy.backends.profile import version_matches

    assert version_matches("3.6.0", "<3.9") and not version_matches("3.9.0", "<3.9")
    assert version_matches("3.9.1+git1234", ">=3.9,<3.10") and not version_matches("3.10.0", ">=3.9,<3.10")
    assert version_matches("3.2", "==3.2.0") and version_matches("3.6.0", "<=3.6") and version_matches("4", ">3.9")


def test_precedence_default_vendor_arch(fake_tree):
    d = load_profile("acme")
    assert d.data["who"] == "vendor" and d.num_cores == 8
    a = load_profile("acme", "x1")
    assert a.data["who"] == "arch" and a.num_cores == 16
    # dicts merge deeply: kv_tile from the vendor, q_tiles and split_kv from the default
    assert a.attention == {"q_tiles": [16, 32], "kv_tile": 64, "split_kv": {"max_seqs": 0, "num_splits": 1}}
    # lists are replaced, not concatenated; sibling keys survive
    assert a.gemm == {"tiles": [{"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}], "group_m": 1}
    assert a.sources == [
        str(fake_tree / "default.yaml"),
        str(fake_tree / "acme/default.yaml"),
        str(fake_tree / "acme/x1.yaml"),
    ]
    # single-file vendor
    s = load_profile("solo")
    assert s.data["who"] == "solo" and s.num_cores == 3 and s.kv_block_size == 16


def _write_tuned(tuned_root: Path, vendor: str, arch: str, body: dict, **header) -> Path:
    hdr = {
        "device": "Acme X1",
        "triton_version": prof_mod.installed_triton()[1],
        "triton_package": prof_mod.installed_triton()[0],
        "kernel_source_hash": prof_mod.kernel_source_hash(),
    }
    hdr.update(header)
    path = tuned_root / vendor / f"{arch}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**hdr, **body}, sort_keys=False))
    return path


def test_tuned_beats_arch(fake_tree, tmp_path, monkeypatch):
    tuned_root = tmp_path / "tuned_here"
    monkeypatch.setenv("PORTABLE_XY_PROFILE_DIR", str(tuned_root))
    path = _write_tuned(tuned_root, "acme", "x1", {"num_cores": 99, "who": "tuned"})
    p = load_profile("acme", "x1")
    assert p.data["who"] == "tuned" and p.num_cores == 99
    assert p.gemm["tiles"] == [{"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}]  # untouched arch key
    assert p.sources[-1] == str(path)
    assert p.tuned["device"] == "Acme X1"
    assert "kernel_source_hash" not in p.data and "device" not in p.data
    assert p.with_num_cores(4).tuned == p.tuned
    # stale: ignored with a warning naming the file
    _write_tuned(tuned_root, "acme", "x1", {"num_cores": 99}, kernel_source_hash="sha256:stale")
    with pytest.warns(UserWarning, match=r"ignoring stale tuned profile .*x1\.yaml.*kernel_source_hash"):
        q = load_profile("acme", "x1")
    assert q.num_cores == 16 and q.tuned is None


def test_unknown_vendor_error():
    with pytest.raises(ValueError) as ei:
        load_profile("tpu", "v5e")  # a vendor without a platform (rocm was the example before it had one)
    msg = str(ei.value)
    assert "no profile for vendor 'tpu'" in msg
    for v in ("ascend", "cpu", "cuda", "interpret"):
        assert v in msg
    assert "'default'" not in msg  # default.yaml is not a vendor


def test_profile_file_must_be_a_mapping(fake_tree):
    (fake_tree / "acme" / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_profile("acme", "bad")


ASCEND_SOCS = ["Ascend910B1", "Ascend910B2", "Ascend910B3", "Ascend910B4", "Ascend910_9382", "Ascend910_9391",
               "Ascend910C", "Ascend310P3", "Ascend910A", ""]  # fmt: skip


def test_every_detected_arch_has_a_profile_or_the_documented_fallback():
    """Whatever arch name backends/device.py returns, the profile resolves: the arch file where one
    is shipped, else the vendor default (and a tuned file would be written and read under the
    same name, see test_tuner)."""
    from portable_xy.backends.device import DeviceInfo, ascend_arch, cuda_arch, shipped_arch_file

    names = {("cuda", cuda_arch(cc)) for cc in (70, 75, 80, 86, 87, 89, 90, 100, 120)}
    names |= {("ascend", ascend_arch(soc)) for soc in ASCEND_SOCS}
    assert ascend_arch("Ascend910C") == ascend_arch("Ascend910_9382") == "910_93"  # one mapping for A3 parts
    for vendor, arch in sorted(names, key=str):
        path = shipped_arch_file(vendor, arch)
        backend = {"cuda": "cuda", "ascend": "npu"}[vendor]
        profile = DeviceInfo(backend, None, "test", arch).profile(tuned=False)
        vendor_default = str(PROFILE_DIR / vendor / "default.yaml")
        assert vendor_default in profile.sources
        if path is None:
            assert profile.sources[-1] == vendor_default, (arch, profile.sources)
        else:
            assert profile.sources[-1] == str(path) and path.stem == arch
    assert {a for v, a in names if shipped_arch_file(v, a)} == {"sm80", "sm90", "910b", "910_93"}
