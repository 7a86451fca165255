"""The soak of ``benchmarks/soak_server.py`` with a small count, in the default suite: a mix of
streaming / non-streaming chat and completions, clients that cancel mid-stream and malformed
requests against a real server; every good request answered, every bad one its 4xx, no 5xx,
nothing left running or holding KV blocks afterwards, and no RSS growth after the warm-up."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from portable_xy.tools.bench.serve import serve_command, start_server, stop_server

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak_server.py"


def test_soak_small(tiny_llama):
    spec = importlib.util.spec_from_file_location("soak_server", SCRIPT)
    soak = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = soak  # its dataclasses look their module up
    spec.loader.exec_module(soak)
    cmd = serve_command(tiny_llama, "--backend", "cpu", "--dtype", "float32", "--max-model-len", "512")
    proc, url = start_server(cmd)
    try:
        report = soak.run(url, requests=120, clients=12, max_tokens=24, seed=3, pid=proc.pid)
    finally:
        stop_server(proc)
    assert report["num_failures"] == 0, report["failures"]
    assert report["http_5xx"] == 0 and report["still_serving"]
    assert report["after"] == {"num_requests_running": 0.0, "num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}
    assert set(report["sent"]) == {"stream_chat", "chat", "completion", "stream_completion", "cancel", "bad"}
    assert report["rss_growth_after_warmup_mib"] <= 64 and report["ok"]
