"""Backend profiles: per-vendor, per-architecture tuning data kept as YAML files.

Precedence, lowest to highest (later files override keys of earlier ones, dicts merge deeply):

1. ``profiles/default.yaml``
2. ``profiles/<vendor>/default.yaml`` (or ``profiles/<vendor>.yaml`` for single-file vendors)
3. ``profiles/<vendor>/<arch>.yaml``
4. a tuned file written by ``portable-xy kernels tune`` in ``$PORTABLE_XY_PROFILE_DIR``
   (default ``~/.cache/portable_xy/profiles``), same ``<vendor>/<arch>.yaml`` layout.

No autotuning happens on the hot path: kernels read their tiles from the resolved profile.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROFILE_DIR = Path(__file__).parent / "profiles"


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def tuned_profile_dir() -> Path:
    return Path(os.environ.get("PORTABLE_XY_PROFILE_DIR", Path.home() / ".cache" / "portable_xy" / "profiles"))


@dataclass
class Profile:
    """Resolved tuning data for one backend on one architecture."""

    vendor: str
    arch: str | None
    data: dict[str, Any]
    sources: list[str] = field(default_factory=list)

    @property
    def kv_block_size(self) -> int:
        return int(self.data["kv_block_size"])

    @property
    def chunk_align(self) -> int:
        return int(self.data["chunk_align"])

    @property
    def num_cores(self) -> int:
        return int(self.data["num_cores"])

    @property
    def attention(self) -> dict[str, Any]:
        return self.data["attention"]

    @property
    def gemm(self) -> dict[str, Any]:
        return self.data["gemm"]

    def with_num_cores(self, n: int) -> Profile:
        """A copy whose core count is ``n`` (read from the device at start-up)."""
        data = copy.deepcopy(self.data)
        data["num_cores"] = int(n)
        return Profile(self.vendor, self.arch, data, list(self.sources))


def _vendor_files(vendor: str, arch: str | None) -> list[Path]:
    files = [PROFILE_DIR / "default.yaml"]
    vdir = PROFILE_DIR / vendor
    if vdir.is_dir():
        files.append(vdir / "default.yaml")
        if arch:
            files.append(vdir / f"{arch}.yaml")
    else:
        files.append(PROFILE_DIR / f"{vendor}.yaml")
    if arch:
        files.append(tuned_profile_dir() / vendor / f"{arch}.yaml")
    return files


def load_profile(vendor: str, arch: str | None = None) -> Profile:
    """Resolve the profile for ``vendor`` (``cpu``, ``interpret``, ``cuda``, ``ascend``) and
    ``arch`` (``sm80``, ``sm90``, ``910b``, ``910_93``...), applying the precedence above."""
    known = sorted(p.stem if p.is_file() else p.name for p in PROFILE_DIR.iterdir() if p.stem != "default")
    if not (PROFILE_DIR / vendor).is_dir() and not (PROFILE_DIR / f"{vendor}.yaml").is_file():
        raise ValueError(f"no profile for vendor {vendor!r}; known vendors: {known}")
    data: dict[str, Any] = {}
    sources = []
    for path in _vendor_files(vendor, arch):
        if path.is_file():
            with open(path) as f:
                layer = yaml.safe_load(f) or {}
            if not isinstance(layer, dict):
                raise ValueError(f"profile file {path} must hold a mapping, got {type(layer).__name__}")
            data = _deep_merge(data, layer)
            sources.append(str(path))
    return Profile(vendor=vendor, arch=arch, data=data, sources=sources)
