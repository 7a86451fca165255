"""The self-check's report: one JSON file per stage, written when the stage ends, and a markdown
summary that grows stage by stage, so that a run cut short still leaves what it measured. Progress
goes to stderr with a timestamp and the time since the start."""

from __future__ import annotations

import json
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "portable_xy.selfcheck"


@dataclass
class Check:
    """One check: ``status`` is ``pass``, ``fail`` or ``skip`` (with the reason in ``note``)."""

    name: str
    status: str
    note: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


class Stage:
    """The checks and data of one stage, as it runs."""

    def __init__(self, report: Report, index: int, name: str) -> None:
        self.report, self.index, self.name = report, index, name
        self.checks: list[Check] = []
        self.data: dict[str, Any] = {}
        self.t0 = time.time()

    def check(self, name: str, ok: bool, note: str = "", **detail: Any) -> bool:
        """Record a pass / fail; returns ``ok``."""
        self._add(Check(name, "pass" if ok else "fail", note, detail))
        return ok

    def skip(self, name: str, why: str) -> None:
        self._add(Check(name, "skip", why))

    def run(self, name: str, fn, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as a check: it passes when it returns, fails with the error when
        it raises (an ``AssertionError``'s message is the reason); returns its result or None."""
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a failing check is a result, the run goes on
            self.check(name, False, f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc(limit=6))
            return None
        self.check(name, True, **(result if isinstance(result, dict) else {}))
        return result

    def _add(self, c: Check) -> None:
        self.checks.append(c)
        self.report.progress(f"{self.name}: {c.name}: {c.status.upper()}{' (' + c.note + ')' if c.note else ''}")

    @property
    def failed(self) -> int:
        return sum(c.status == "fail" for c in self.checks)


class Report:
    """Writes ``OUT/NN_stage.json`` per stage and ``OUT/summary.md``."""

    def __init__(self, out: Path, meta: dict[str, Any], budget_s: float) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.meta, self.budget_s = meta, budget_s
        self.t0 = time.time()
        self.stages: list[Stage] = []
        (self.out / "summary.md").write_text(
            f"# portable_xy self-check\n\n{', '.join(f'{k}: {v}' for k, v in meta.items())}\n\n"
            "| stage | pass | fail | skip | seconds |\n| --- | --- | --- | --- | --- |\n"
        )

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        """Seconds left of the time budget."""
        return self.budget_s - self.elapsed()

    def progress(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, name: str):
        st = Stage(self, len(self.stages) + 1, name)
        self.stages.append(st)
        self.progress(f"stage {st.index}: {name}")
        try:
            yield st
        except Exception as e:  # noqa: BLE001 - a stage that breaks is a failed check, not the end
            st.check("stage", False, f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc(limit=8))
        finally:
            self._write(st)

    def _write(self, st: Stage) -> None:
        seconds = round(time.time() - st.t0, 1)
        body = {"schema": SCHEMA, "schema_version": 1, "stage": st.name, "meta": self.meta, "seconds": seconds,
                "checks": [asdict(c) for c in st.checks], "data": st.data}  # fmt: skip
        (self.out / f"{st.index:02d}_{st.name}.json").write_text(json.dumps(body, indent=1, default=str) + "\n")
        n = {s: sum(c.status == s for c in st.checks) for s in ("pass", "fail", "skip")}
        lines = [f"| {st.name} | {n['pass']} | {n['fail']} | {n['skip']} | {seconds} |\n"]
        with open(self.out / "summary.md", "a") as f:
            f.writelines(lines)
        self.progress(f"stage {st.index}: {st.name} done in {seconds}s: {n['pass']} pass, {n['fail']} fail, "
                      f"{n['skip']} skip")  # fmt: skip

    def finish(self) -> int:
        """Append the failures and skips to the summary; the exit status (1 on any failure)."""
        failed = [(s.name, c) for s in self.stages for c in s.checks if c.status == "fail"]
        skipped = [(s.name, c) for s in self.stages for c in s.checks if c.status == "skip"]
        with open(self.out / "summary.md", "a") as f:
            f.write(f"\nTotal {self.elapsed():.0f} s. {'FAILED' if failed else 'All checks passed'}.\n")
            for title, rows in (("Failures", failed), ("Skipped", skipped)):
                if rows:
                    f.write(f"\n## {title}\n\n" + "".join(f"- {s} / {c.name}: {c.note}\n" for s, c in rows))
        self.progress(f"done: {len(failed)} failed, {len(skipped)} skipped; report in {self.out}")
        return 1 if failed else 0
