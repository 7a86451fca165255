"""Hugging Face model ids (``LLM("org/name")``): resolved from the local HF cache (the real
``models--org--name`` layout in a temporary ``HF_HOME``) with no network, and a clear error naming
the id and the cache folder when the model is neither cached nor reachable. Each case runs in a
fresh process, since huggingface_hub reads ``HF_HOME`` / ``HF_HUB_OFFLINE`` when imported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

RUN = """
import sys
from portable_xy import LLM, SamplingParams
from portable_xy.models.loader import ModelLoadError
try:
    llm = LLM(sys.argv[1], backend="cpu", dtype="float32", max_model_len=64)
except ModelLoadError as e:
    print("ERROR", e)
else:
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    print("TOKENS", out[0].outputs[0].token_ids, llm.config.model_path)
"""


def _hf_cache(root: Path, repo_id: str, model_dir: str) -> Path:
    """``root/hub/models--org--name/{refs/main, snapshots/<rev>/...}`` holding ``model_dir``'s files."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    shutil.copytree(model_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return snap


def _run(model: str, **env) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", RUN, model], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return next(ln for ln in out.stdout.splitlines() if ln.startswith(("TOKENS", "ERROR")))


def test_hub_id_loads_from_the_local_cache_offline(tiny_llama, tmp_path):
    snap = _hf_cache(tmp_path / "hf", "tiny-org/tiny-llama", tiny_llama)
    by_id = _run("tiny-org/tiny-llama", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    by_path = _run(tiny_llama)
    assert by_id.startswith("TOKENS") and str(snap) in by_id
    assert by_id.split("]")[0] == by_path.split("]")[0]  # the same tokens


def test_missing_hub_model_names_the_id_and_the_cache(tmp_path):
    home = tmp_path / "hf"
    offline = _run("tiny-org/absent", HF_HOME=str(home), HF_HUB_OFFLINE="1")
    assert offline.startswith("ERROR") and "'tiny-org/absent'" in offline and str(home / "hub") in offline
    assert "HF_HUB_OFFLINE=1" in offline
    # online but unreachable (a closed local port): cached nowhere, downloadable from nowhere
    unreachable = _run("tiny-org/absent", HF_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9")
    assert unreachable.startswith("ERROR") and "'tiny-org/absent'" in unreachable
    assert str(home / "hub") in unreachable and "could not be downloaded" in unreachable
