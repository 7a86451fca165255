"""The GitHub workflows: structure (triggers, jobs, runner labels, steps) and that every
``portable-xy ...`` command parses with this repo's CLI, every ``bash <script>`` exists and every
``pytest -m MARKER`` is a declared marker."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from portable_xy.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
WF = ROOT / ".github" / "workflows"
NAMES = ("ci.yml", "gpu.yml", "ascend-nightly.yml")


def load(name: str) -> dict:
    wf = yaml.safe_load((WF / name).read_text())
    wf["on"] = wf.pop(True, wf.get("on"))  # YAML 1.1 reads the key `on` as True
    return wf


def steps(wf: dict) -> list[dict]:
    return [s for job in wf["jobs"].values() for s in job["steps"]]


def step_lines(step: dict) -> list[str]:
    """The shell lines of a ``run`` step, continuation lines joined."""
    return [ln.strip() for ln in step.get("run", "").replace("\\\n", " ").splitlines() if ln.strip()]


def run_lines(wf: dict) -> list[str]:
    return [ln for s in steps(wf) for ln in step_lines(s)]


def commands(line: str, program: str) -> list[list[str]]:
    """The argv of each ``program`` invocation in a shell line (up to ``&&``, ``;``, ``|``, ``)``)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out, cur = [], None
    for tok in [*lex, ";"]:
        if set(tok) <= set("();<>|&"):
            if cur is not None:
                out.append(cur)
            cur = None
        elif cur is not None:
            cur.append(tok)
        elif tok == program:
            cur = []
    return out


def opt(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def markers(config: pytest.Config) -> set[str]:
    """Markers declared in pyproject.toml ([tool.pytest.ini_options] markers)."""
    return {m.split(":")[0].strip() for m in config.getini("markers")}


def device_test_steps(wf: dict, marker: str) -> list[dict]:
    """Steps running ``pytest -m marker``; each must turn the interpreter default of conftest off."""
    out = []
    for s in steps(wf):
        if any(opt(argv, "-m") == marker for ln in step_lines(s) for argv in commands(ln, "pytest")):
            out.append(s)
    return out


def runs_on(job: dict) -> list[str]:
    r = job["runs-on"]
    return [r] if isinstance(r, str) else list(r)


@pytest.mark.parametrize("name", NAMES)
def test_references_exist(name, pytestconfig):
    parser = build_parser()
    lines = run_lines(load(name))
    for line in lines:
        for argv in commands(line, "portable-xy"):
            args = parser.parse_args(argv)  # SystemExit on an unknown subcommand or option
            assert callable(args.func), line
        for argv in commands(line, "bash"):
            assert (ROOT / argv[0]).is_file(), f"{name}: {line}: no {argv[0]}"
        for argv in commands(line, "pytest"):
            m = opt(argv, "-m")
            assert m is None or m in markers(pytestconfig), f"{name}: marker {m!r} not declared in pyproject.toml"
    uses = [s["uses"] for s in steps(load(name)) if "uses" in s]
    assert any(u.startswith("actions/checkout@") for u in uses)


def test_ci_runs_the_readme_command():
    wf = load("ci.yml")
    assert {"push", "pull_request"} <= set(wf["on"])
    (job,) = wf["jobs"].values()
    assert runs_on(job)[0].startswith("ubuntu-")
    assert "bash .ci/run" in run_lines(wf)
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text()


def test_gpu_workflow():
    wf = load("gpu.yml")
    (job,) = wf["jobs"].values()
    assert set(runs_on(job)) == {"self-hosted", "gpu"}
    lines = run_lines(wf)
    (test_step,) = device_test_steps(wf, "cuda")
    assert test_step["env"]["TRITON_INTERPRET"] == "0"
    bench = [a for ln in lines for a in commands(ln, "portable-xy") if a[:2] == ["bench", "kernels"]]
    assert len(bench) == 1 and opt(bench[0], "--backend") == "cuda"
    out = opt(bench[0], "--out")
    upload = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert len(upload) == 1 and out in upload[0]["with"]["path"] and upload[0]["with"]["name"] == "kernels-cuda"


def test_ascend_nightly_workflow():
    wf = load("ascend-nightly.yml")
    assert "workflow_dispatch" in wf["on"] and wf["on"]["schedule"][0]["cron"].count(" ") == 4
    (job,) = wf["jobs"].values()
    assert set(runs_on(job)) == {"self-hosted", "ascend"}
    lines = run_lines(wf)
    text = "\n".join(lines)
    # triton-ascend replaces upstream triton: uninstall first, then the pinned versions
    assert text.index("pip uninstall -y triton") < text.index("$TRITON_ASCEND_SPEC")
    assert wf["env"]["TRITON_ASCEND_SPEC"].startswith("triton-ascend==")
    assert wf["env"]["TORCH_NPU_SPEC"].startswith("torch-npu==")
    (test_step,) = device_test_steps(wf, "npu")
    assert test_step["env"]["TRITON_INTERPRET"] == "0"
    bench = [a for ln in lines for a in commands(ln, "portable-xy")]
    kernels = [a for a in bench if a[:2] == ["bench", "kernels"]]
    assert len(kernels) == 1 and opt(kernels[0], "--backend") == "npu"
    npu_json = opt(kernels[0], "--out")
    # the latest GPU artifact is downloaded and compared with this run's JSON
    assert any("gh run download" in ln and "kernels-cuda" in ln for ln in lines)
    compares = [a for a in bench if a[:2] == ["bench", "compare"]]
    assert compares and all(npu_json in a for a in compares)
    assert any("gpu-bench/kernels-cuda.json" in a for a in compares)
    upload = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload and npu_json in upload[0]["with"]["path"]
