"""``portable-xy bench compare`` on JSON files from tiny CPU runs (and a doctored copy with known
latencies): report rows, speedups, utilisation cells and the PNG plots."""

from __future__ import annotations

import copy
import json

import pytest

from portable_xy.cli import main
from portable_xy.tools.bench import kernels as bk
from portable_xy.tools.bench.compare import by_case, compare, speedup

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cpu_report():
    return bk.run_kernel_bench(
        "cpu", ["llama2-7b"], reps=1, warmup=0, peaks=(0.5, 20.0), case_filter="qkv|down/M=1$|decode_b2|mixed",
        log=lambda *_: None,
    )  # fmt: skip


def _doctored(report: dict) -> dict:
    """A copy where every vendor call is 2x and every baseline 3x our kernel, utilisation 25 %."""
    out = copy.deepcopy(report)
    out["env"]["device"] = "doctored"
    for case in [by_case(out, k) for k in ("gemm", "attention")]:
        for impls in case.values():
            ours = next(r for r in impls.values() if r["impl"] in bk.OURS.values())
            ours["utilisation"] = 0.25
            for r in impls.values():
                if r["impl"] == "vendor":
                    r["latency_s"] = 2 * ours["latency_s"]
                elif r["impl"] in bk.BASELINE.values():
                    r["latency_s"] = 3 * ours["latency_s"]
    return out


def _table(md: str, title: str) -> list[list[str]]:
    part = md.split(title, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]  # without header and rule


def test_compare_writes_rows_speedups_and_plots(tmp_path, cpu_report):
    a, b = tmp_path / "cpu.json", tmp_path / "doctored.json"
    a.write_text(json.dumps(cpu_report))
    b.write_text(json.dumps(_doctored(cpu_report)))
    out = tmp_path / "cmp"
    assert main(["bench", "compare", str(a), str(b), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for kernel in ("gemm", "attention"):
        rows = _table(md, f"## {kernel}:")
        cases = list(by_case(cpu_report, kernel))
        assert [r[0] for r in rows] == cases
        for r in rows:
            assert len(r) == 7  # case + 3 cells per file
            assert r[4:] == ["25%", "2x", "3x" if kernel == "attention" else "n/a"]  # cpu: no single-tile GEMM
            assert r[1].endswith("%") and r[2].endswith("x")
        png = out / f"utilisation_{kernel}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert (out / f"speedup_{kernel}.png").read_bytes()[:8] == PNG_MAGIC
    runs = _table(md, "## Runs")
    assert [r[0] for r in runs] == ["cpu", "doctored"] and runs[1][2] == "doctored"
    summary = {(r[0], r[1]): r for r in _table(md, "## Summary")}
    assert summary["doctored", "attention"][2:] == ["2x", "3x", "25%"]
    assert summary["doctored", "gemm"][2:] == ["2x", "n/a", "25%"]


def test_cpu_report_has_no_single_tile_baseline(cpu_report):
    impls = next(iter(by_case(cpu_report, "gemm").values()))
    assert speedup(impls, "gemm", "single_tile") is None
    want = impls["vendor"]["latency_s"] / impls["smooth_gemm"]["latency_s"]
    assert speedup(impls, "gemm", "vendor") == pytest.approx(want)


def test_compare_rejects_other_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(ValueError, match="not a kernel report"):
        compare([str(bad)], str(tmp_path / "out"))
