"""Backend profiles: per-vendor, per-architecture tuning data kept as YAML files.

Precedence, lowest to highest (later files override keys of earlier ones, dicts merge deeply):

1. ``profiles/default.yaml``
2. ``profiles/<vendor>/default.yaml`` (or ``profiles/<vendor>.yaml`` for single-file vendors)
3. ``profiles/<vendor>/<arch>.yaml``
4. a tuned file written by ``portable-xy kernels tune`` in ``$PORTABLE_XY_PROFILE_DIR``
   (default ``~/.cache/portable_xy/profiles``), same ``<vendor>/<arch>.yaml`` layout
   (``<vendor>/default.yaml`` when no arch is given, e.g. the ``interpret`` backend).

An ``arch`` without a shipped file of its own skips step 3 (each platform in ``backends/platforms/`` names its archs).

Within a file, ``triton_versions: {SPEC: {...}}`` holds settings for some Triton versions only:
each mapping whose SPEC (comma-separated ``<``, ``<=``, ``>``, ``>=``, ``==`` clauses, e.g.
``"<3.9"``) the installed Triton satisfies is merged over the rest of that file. It is where a
compiler version that allocates registers differently gets other tiles.

A tuned file starts with header fields (:data:`TUNED_HEADER_KEYS`): ``device`` (the device name it
was timed on), ``triton_version`` / ``triton_package`` and ``kernel_source_hash`` (of the kernel
modules). They are metadata, not profile data: the loader removes them (``Profile.tuned`` keeps
them) and IGNORES the whole tuned file, with a warning, when the hash or the Triton version no
longer match what is installed (or, if ``load_profile`` is given ``device_name``, the device), so a
stale tuning never silently drives new kernels.

No autotuning happens on the hot path: kernels read their tiles from the resolved profile.
"""

from __future__ import annotations

import copy
import hashlib
import operator
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..envs import tuned_profile_dir

PROFILE_DIR = Path(__file__).parent / "profiles"

# Header fields of a tuned profile file (not merged into the profile data).
TUNED_HEADER_KEYS = ("device", "triton_version", "triton_package", "kernel_source_hash", "tuned_at", "tuner")


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, val in over.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], val)
        else:
            out[key] = copy.deepcopy(val)
    return out


def kernel_source_dir() -> Path:
    """The ``portable_xy.triton_kernels`` folder (a sibling of this package both in the source
    tree and in an installed wheel), found without importing it."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "triton_kernels", here.parent / "portable_xy" / "triton_kernels"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"triton_kernels package not found next to {here}")


def kernel_source_hash() -> str:
    """``sha256:<hex>`` over the kernel modules' sources (file names and bytes, sorted). The kernel
    package holds kernels, their wrappers and launch helpers only (AOT specs and other tooling live
    in ``portable_xy.tools``), so only a change to what runs invalidates a tuning."""
    h = hashlib.sha256()
    for path in sorted(kernel_source_dir().glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()[:16]


def installed_triton() -> tuple[str | None, str | None]:
    """``(package, version)`` of the installed Triton distribution (``triton`` or
    ``triton-ascend``, which share the ``triton`` module and may share version numbers), read
    from package metadata without importing Triton; ``(None, None)`` when there is none."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("triton", "triton-ascend"):
        try:
            return dist, version(dist)
        except PackageNotFoundError:
            continue
    return None, None


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def version_matches(version: str, spec: str) -> bool:
    """Whether ``version`` (``3.6.0``) satisfies every clause of ``spec`` (``">=3.6,<3.9"``)."""
    ops = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt, ">": operator.gt}
    have = _version_tuple(version)
    for clause in (c.strip() for c in spec.split(",") if c.strip()):
        op = next((o for o in ops if clause.startswith(o)), None)
        if op is None:
            raise ValueError(f"triton_versions: {spec!r}: each clause needs one of {list(ops)}")
        want = _version_tuple(clause[len(op) :])
        n = max(len(have), len(want))
        if not ops[op](have + (0,) * (n - len(have)), want + (0,) * (n - len(want))):
            return False
    return True


def _apply_triton_versions(layer: dict, path: Path) -> tuple[dict, list[str]]:
    """``layer`` with its ``triton_versions`` entries that match the installed Triton merged in;
    and the specs applied."""
    specs = layer.pop("triton_versions", None) or {}
    if not isinstance(specs, dict) or not all(isinstance(v, dict) for v in specs.values()):
        raise ValueError(f"profile file {path}: triton_versions must map version specs to mappings")
    version = installed_triton()[1]
    applied = [spec for spec in specs if version is not None and version_matches(version, spec)]
    for spec in applied:
        layer = _deep_merge(layer, specs[spec])
    return layer, applied


def tuned_file_problems(header: dict, device_name: str | None = None) -> list[str]:
    """Why a tuned file's header does not match this installation (empty list: it matches)."""
    out = []
    want_hash = kernel_source_hash()
    if header.get("kernel_source_hash") != want_hash:
        out.append(f"kernel_source_hash {header.get('kernel_source_hash')!r} != current {want_hash!r}")
    pkg, ver = installed_triton()
    if str(header.get("triton_version")) != str(ver):
        out.append(f"triton_version {header.get('triton_version')!r} != installed {ver!r}")
    elif header.get("triton_package") and header.get("triton_package") != pkg:
        out.append(f"triton_package {header.get('triton_package')!r} != installed {pkg!r}")
    if device_name is not None and header.get("device") != device_name:
        out.append(f"device {header.get('device')!r} != {device_name!r}")
    return out


@dataclass
class Profile:
    """Resolved tuning data for one backend on one architecture."""

    vendor: str
    arch: str | None
    data: dict[str, Any]
    sources: list[str] = field(default_factory=list)
    # header of the tuned file that was applied (device, triton_version, kernel_source_hash, ...)
    tuned: dict[str, Any] | None = None
    # the ``triton_versions`` entries applied, as ``"<file>: triton <spec>"``
    triton_overrides: list[str] = field(default_factory=list)

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
        return Profile(self.vendor, self.arch, data, list(self.sources), copy.deepcopy(self.tuned),
                       list(self.triton_overrides))  # fmt: skip


def _vendor_files(vendor: str, arch: str | None, tuned: bool) -> list[Path]:
    files = [PROFILE_DIR / "default.yaml"]
    vdir = PROFILE_DIR / vendor
    if vdir.is_dir():
        files.append(vdir / "default.yaml")
        if arch:
            files.append(vdir / f"{arch}.yaml")
    else:
        files.append(PROFILE_DIR / f"{vendor}.yaml")
    if tuned:  # <vendor>/<arch>.yaml, or <vendor>/default.yaml for arch-less vendors (interpret)
        files.append(tuned_profile_dir() / vendor / f"{arch or 'default'}.yaml")
    return files


def load_profile(vendor: str, arch: str | None = None, device_name: str | None = None, tuned: bool = True) -> Profile:
    """Resolve the profile for ``vendor`` (``cpu``, ``interpret``, ``cuda``, ``ascend``) and
    ``arch`` (``sm80``, ``sm90``, ``910b``, ``910_93``...), applying the precedence above.
    ``device_name``: when given, a tuned file timed on another device is ignored too.
    ``tuned=False``: the shipped files only."""
    known = sorted(p.stem if p.is_file() else p.name for p in PROFILE_DIR.iterdir() if p.stem != "default")
    if not (PROFILE_DIR / vendor).is_dir() and not (PROFILE_DIR / f"{vendor}.yaml").is_file():
        raise ValueError(f"no profile for vendor {vendor!r}; known vendors: {known}")
    data: dict[str, Any] = {}
    sources, overrides = [], []
    header_applied = None
    files = _vendor_files(vendor, arch, tuned)
    tuned_path = files[-1] if tuned else None
    for path in files:
        if path.is_file():
            with open(path) as f:
                layer = yaml.safe_load(f) or {}
            if not isinstance(layer, dict):
                raise ValueError(f"profile file {path} must hold a mapping, got {type(layer).__name__}")
            if path == tuned_path:
                header = {k: layer.pop(k) for k in TUNED_HEADER_KEYS if k in layer}
                problems = tuned_file_problems(header, device_name)
                if problems:
                    warnings.warn(
                        f"ignoring stale tuned profile {path}: {'; '.join(problems)} "
                        "(re-run `portable-xy kernels tune`)",
                        stacklevel=2,
                    )
                    continue
                header_applied = header
            layer, applied = _apply_triton_versions(layer, path)
            data = _deep_merge(data, layer)
            sources.append(str(path))
            overrides += [f"{path}: triton {spec}" for spec in applied]
    return Profile(vendor=vendor, arch=arch, data=data, sources=sources, tuned=header_applied,
                   triton_overrides=overrides)  # fmt: skip
