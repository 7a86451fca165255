"""Command-line flags for :class:`~portable_xy.config.EngineConfig`: one ``--flag`` per field
(vLLM's names, dashes for underscores), shared by ``portable-xy serve`` and the benchmarks, so an
engine setting is named and parsed in one place."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any

from .config import EngineConfig


def _arg_type(hint: Any) -> type:
    """The scalar type of an EngineConfig field's annotation (``str`` for a union of several)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        scalars = [a for a in typing.get_args(hint) if a is not type(None)]
        return scalars[0] if len(scalars) == 1 else str
    return hint


def engine_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EngineConfig) if f.init]


def add_engine_args(parser: argparse.ArgumentParser, model: bool = True, **defaults: Any) -> None:
    """One ``--flag`` per :class:`EngineConfig` field; ``defaults`` override the config's own
    (a benchmark that runs on the CPU in bf16 says ``backend="cpu", dtype="bfloat16"``).
    ``model=False`` leaves ``--model`` to the caller (``serve`` also takes it positionally)."""
    unknown = set(defaults) - {f.name for f in engine_fields()}
    if unknown:
        raise TypeError(f"add_engine_args: not EngineConfig fields: {sorted(unknown)}")
    hints = typing.get_type_hints(EngineConfig)
    for f in engine_fields():
        if f.name == "model" and not model:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        kind = _arg_type(hints[f.name])
        if f.name == "model":
            parser.add_argument(flag, default=default, help="HF model directory, .gguf file or hub id "
                                "(default: SmolLM2-135M-Instruct)")  # fmt: skip
        elif f.name == "speculative_config":
            example = '{"method": "ngram", ...}'
            parser.add_argument(flag, type=json.loads, default=default, help=f"JSON, e.g. '{example}'")
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif kind in (int, float):
            parser.add_argument(flag, type=kind, default=default)
        else:
            parser.add_argument(flag, default=default)


def engine_kwargs(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """The :class:`EngineConfig` keywords parsed by :func:`add_engine_args`, with ``overrides``."""
    kw = {f.name: getattr(args, f.name) for f in engine_fields() if hasattr(args, f.name)}
    kw.update(overrides)
    return kw


def engine_flags(args: argparse.Namespace, **overrides: Any) -> list[str]:
    """The same settings as command-line flags (those that differ from the config's defaults), for
    starting ``portable-xy serve`` with them; ``model`` is left out (``serve`` takes it first)."""
    kw = engine_kwargs(args, **overrides)
    out: list[str] = []
    for f in engine_fields():
        if f.name == "model" or f.name not in kw or kw[f.name] == f.default:
            continue
        flag, val = "--" + f.name.replace("_", "-"), kw[f.name]
        if isinstance(val, bool):
            out.append(flag if val else "--no-" + flag[2:])
        elif val is None:
            out += [flag, "none"] if f.name == "quantization" else []
        else:
            out += [flag, json.dumps(val) if isinstance(val, dict) else str(val)]
    return out
