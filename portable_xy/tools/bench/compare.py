"""``portable-xy bench compare A.json B.json ... --out DIR``: kernel reports side by side.

Writes ``DIR/report.md`` (one table per kernel: per case and per file, our kernel's share of the
device peak and its speedup over the vendor library and over the baseline) and PNG plots
``DIR/{utilisation,speedup}_{gemm,attention}.png``. Speedup = baseline latency / our latency.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .kernels import BASELINE, OURS, validate_report

KERNELS = ("gemm", "attention")


def load_reports(paths: list[str]) -> list[tuple[str, dict]]:
    """``[(label, report)]``; labels are the file stems (made unique with their position)."""
    out = []
    stems = [Path(p).stem for p in paths]
    for i, p in enumerate(paths):
        report = json.loads(Path(p).read_text())
        problems = validate_report(report)
        if problems:
            raise ValueError(f"{p}: not a kernel report: {'; '.join(problems[:3])}")
        label = stems[i] if stems.count(stems[i]) == 1 else f"{stems[i]}#{i + 1}"
        out.append((label, report))
    return out


def by_case(report: dict, kernel: str) -> dict[str, dict[str, dict]]:
    """``{case: {impl: result}}`` of one kernel, cases in report order."""
    out: dict[str, dict[str, dict]] = {}
    for r in report["results"]:
        if r["kernel"] == kernel:
            out.setdefault(r["case"], {})[r["impl"]] = r
    return out


def speedup(impls: dict[str, dict], kernel: str, over: str) -> float | None:
    """Latency of ``over`` (an impl name) / latency of our kernel; None when either is missing."""
    ours, ref = impls.get(OURS[kernel]), impls.get(over)
    return ref["latency_s"] / ours["latency_s"] if ours and ref else None


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.3g}%" if pct else f"{v:.3g}x"


def _geomean(vals: list[float]) -> float | None:
    vals = [v for v in vals if v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def markdown(reports: list[tuple[str, dict]]) -> str:
    """The report: runs, a summary of geometric-mean speedups, then one table per kernel."""
    lines = ["# Kernel benchmark comparison", "", "## Runs", ""]
    lines += ["| label | backend | device | profile | driver | torch | triton | dtype | tiny | timing | errors |",
              "|" + " --- |" * 11]  # fmt: skip
    for label, r in reports:
        e, t = r["env"], r["timing"]
        lines.append(f"| {label} | {e['backend']} | {e['device']} | {e['profile']} | {e.get('driver') or '-'} | "
                     f"{e['torch']} | {e.get('triton') or '-'} | {r['dtype']} | {r['tiny']} | "
                     f"{t['method']}, median of {t['reps']} | {len(r['errors'])} |")  # fmt: skip
    lines += ["", "## Summary (geometric mean over cases)", "",
              "| label | kernel | speedup vs vendor | speedup vs baseline | mean utilisation |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for label, r in reports:
        for k in KERNELS:
            cases = by_case(r, k)
            if not cases:
                continue
            utils = [c[OURS[k]]["utilisation"] for c in cases.values() if OURS[k] in c]
            utils = [u for u in utils if u is not None]
            mean_u = sum(utils) / len(utils) if utils else None
            sv = _geomean([speedup(c, k, "vendor") for c in cases.values()])
            sb = _geomean([speedup(c, k, BASELINE[k]) for c in cases.values()])
            lines.append(f"| {label} | {k} | {_fmt(sv)} | {_fmt(sb)} | {_fmt(mean_u, pct=True)} |")
    for k in KERNELS:
        per_file = [(label, by_case(r, k)) for label, r in reports]
        cases = list(dict.fromkeys(c for _, cs in per_file for c in cs))
        if not cases:
            continue
        lines += ["", f"## {k}: {OURS[k]} utilisation (fraction of peak) and speedups", ""]
        head = ["case"]
        for label, _ in per_file:
            head += [f"{label} util", f"{label} vs vendor", f"{label} vs {BASELINE[k]}"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for case in cases:
            cells = [case]
            for _, cs in per_file:
                impls = cs.get(case, {})
                ours = impls.get(OURS[k])
                cells += [_fmt(ours["utilisation"] if ours else None, pct=True), _fmt(speedup(impls, k, "vendor")),
                          _fmt(speedup(impls, k, BASELINE[k]))]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _series(reports, kernel: str, value) -> dict[str, dict[str, list[tuple[str, dict, float]]]]:
    """``{shape: {label: [(case, our result, value)]}}`` where ``value(impls)`` is not None."""
    out: dict[str, dict[str, list]] = {}
    for label, r in reports:
        for case, impls in by_case(r, kernel).items():
            ours = impls.get(OURS[kernel])
            v = value(impls) if ours else None
            if v is not None:
                out.setdefault(ours["shape"], {}).setdefault(label, []).append((case, ours, v))
    return out


def _plot(series, kernel: str, ylabel: str, path: Path, ref_line: float | None) -> bool:
    """GEMM: one panel per shape, value vs M per file; attention: one panel per case group, a bar
    per case and file. False (no file) when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not series:
        return False
    shapes = list(series)
    cols = min(4, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        per_label = series[shape]
        if kernel == "gemm":
            for label, pts in per_label.items():
                pts = sorted(pts, key=lambda p: p[1]["params"]["M"])
                ax.plot([p[1]["params"]["M"] for p in pts], [p[2] for p in pts], marker=".", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M")
        else:
            cases = list(dict.fromkeys(p[0].split("/")[-1] for pts in per_label.values() for p in pts))
            width = 0.8 / len(per_label)
            for i, (label, pts) in enumerate(per_label.items()):
                vals = {p[0].split("/")[-1]: p[2] for p in pts}
                xs = [j + i * width for j, c in enumerate(cases) if c in vals]
                ax.bar(xs, [vals[c] for c in cases if c in vals], width, label=label)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=60, fontsize=6, ha="right")
        if ref_line is not None:  # a ratio: log scale, 1 marked
            ax.axhline(ref_line, color="grey", lw=0.8, ls="--")
            ax.set_yscale("log")
        ax.set_title(shape, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def compare(paths: list[str], out_dir: str) -> list[Path]:
    """Write ``report.md`` and the plots for the reports at ``paths``; returns the written files."""
    reports = load_reports(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.md"]
    written[0].write_text(markdown(reports))
    for k in KERNELS:
        util = _series(reports, k, lambda impls, k=k: impls[OURS[k]]["utilisation"])
        fast = _series(reports, k, lambda impls, k=k: speedup(impls, k, "vendor"))
        for name, series, ylabel, ref in (("utilisation", util, "fraction of peak", None),
                                          ("speedup", fast, "speedup vs vendor", 1.0)):  # fmt: skip
            path = out / f"{name}_{k}.png"
            if _plot(series, k, ylabel, path, ref):
                written.append(path)
    return written


def _run_cli(args: argparse.Namespace) -> int:
    for p in compare(args.reports, args.out):
        print(f"wrote {p}")
    return 0


def add_compare_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="side-by-side markdown report + PNG plots of kernel JSON reports")
    p.add_argument("reports", nargs="+", help="JSON files written by `portable-xy bench kernels --out`")
    p.add_argument("--out", required=True, help="output directory (report.md, *.png)")
    p.set_defaults(func=_run_cli)
    return p
