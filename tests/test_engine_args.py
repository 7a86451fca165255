"""Engine flags are EngineConfig's, defined once (``portable_xy/engine_args.py``): the flags of
``portable-xy serve`` and ``generate``, and the benchmarks', round-trip to the same config."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from portable_xy.cli import build_parser
from portable_xy.config import EngineConfig
from portable_xy.engine_args import add_engine_args, engine_flags, engine_kwargs

ROOT = Path(__file__).resolve().parents[1]


def test_every_init_field_has_a_flag():
    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    dests = {a.dest for a in ap._actions}
    assert {f.name for f in dataclasses.fields(EngineConfig) if f.init} <= dests


def test_defaults_and_unknown_defaults():
    ap = argparse.ArgumentParser()
    add_engine_args(ap, backend="cpu", max_model_len=256)
    args = ap.parse_args([])
    assert (args.backend, args.max_model_len, args.dtype) == ("cpu", 256, "auto")
    with pytest.raises(TypeError, match="max_tokens"):
        add_engine_args(argparse.ArgumentParser(), max_tokens=3)


def test_flags_round_trip_through_serve():
    """A benchmark's settings, handed to ``portable-xy serve`` as flags, parse back to the same
    keywords (bools both ways, None quantization, JSON speculative config, ints)."""
    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    args = ap.parse_args(["--backend", "cpu", "--dtype", "float32", "--no-enable-prefix-caching",
                          "--max-num-batched-tokens", "512", "--quantization", "none", "--enforce-eager",
                          "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])  # fmt: skip
    flags = engine_flags(args, scheduler_policy="prefill_first")
    served = build_parser(tools=False).parse_args(["serve", *flags])
    want = engine_kwargs(args, scheduler_policy="prefill_first", quantization="none")
    got = engine_kwargs(served)
    assert {k: v for k, v in got.items() if k != "model"} == {k: v for k, v in want.items() if k != "model"}


def test_no_hand_written_engine_flags():
    """Scripts take engine flags from add_engine_args; none defines --model / --dtype / --backend
    by hand (tp_cost's --model-dir is the folder it writes its random model to)."""
    pattern = re.compile(r'add_argument\(\s*"--(model|dtype|backend|quantization|max-model-len)"')
    files = [*ROOT.glob("benchmarks/*.py"), ROOT / "portable_xy" / "cli.py", ROOT / "portable_xy" / "server" / "cli.py"]
    hits = [str(p.relative_to(ROOT)) for p in files if pattern.search(p.read_text())]
    assert hits == ["portable_xy/server/cli.py"]  # serve's --model beside its positional MODEL
