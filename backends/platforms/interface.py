"""The :class:`Platform` interface: every fact about a vendor's device in one object.

One subclass per vendor lives beside this file (``cuda.py``, ``rocm.py``, ``ascend.py``,
``cpu.py``, ``interpret.py``); its profiles live in ``backends/profiles/<vendor>/``. Code outside
those files asks the platform (``get_platform(name)``, ``platform_for_device(device)``) instead of
branching on a vendor name or importing a vendor's torch plug-in.
"""

from __future__ import annotations

import itertools
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import torch

from ..profile import PROFILE_DIR, Profile, load_profile


@dataclass(frozen=True)
class DeviceInfo:
    """What :meth:`Platform.detect` found: the backend, its torch device, the device's name, its
    architecture name (``None``: no architecture-specific profile applies) and its core count
    (``None``: the profile's)."""

    backend: str
    device: torch.device | None
    name: str
    arch: str | None = None
    num_cores: int | None = None

    @property
    def platform(self) -> Platform:
        from . import get_platform

        return get_platform(self.backend)

    @property
    def vendor(self) -> str:
        return self.platform.vendor

    def profile(self, tuned: bool = True) -> Profile:
        """The resolved profile for this device, with the detected core count where the profile's
        ``num_cores_from`` asks for it."""
        profile = load_profile(self.vendor, self.arch, tuned=tuned)
        if self.num_cores and profile.data.get("num_cores_from") == self.platform.core_source:
            profile = profile.with_num_cores(self.num_cores)
        return profile


def run_quiet(cmd: list[str]) -> str | None:
    """The first line a command prints, or ``None`` when it is missing or fails (driver versions)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = r.stdout.strip().splitlines()
    return lines[0].strip() if r.returncode == 0 and lines else None


class Platform:
    """A vendor's device, as the engine, the kernels' launchers and the tools see it.

    Class attributes are facts; methods that touch the device import the vendor's modules lazily,
    so every platform can be imported (and its AOT target built) on a machine without the device.
    """

    name: ClassVar[str]  # the backend name users pass (``LLM(backend=...)``)
    vendor: ClassVar[str]  # the profile folder: ``backends/profiles/<vendor>/``
    device_type: ClassVar[str]  # torch's device type
    dist_backend: ClassVar[str] = "gloo"  # torch.distributed backend name
    collective_library: ClassVar[str] = "gloo"  # what that backend runs on this vendor
    dist_gather: ClassVar[bool] = True  # the backend has ``dist.gather`` (else all-gather is used)
    core_source: ClassVar[str | None] = None  # the profile's ``num_cores_from`` value it can detect
    runs_triton: ClassVar[bool] = False  # kernels are Triton kernels
    triton_interpreted: ClassVar[bool] = False  # ... run by the Triton interpreter (TRITON_INTERPRET=1)
    host_threads: ClassVar[bool] = False  # compute runs on CPU threads (a TP rank takes a share)
    graph_capture: ClassVar[bool] = False  # decode steps replay captured device graphs by default
    hf_on_device: ClassVar[bool] = False  # the HF transformers baseline of ``bench e2e`` runs on the device
    event_timer: ClassVar[str | None] = None  # the timer method's name when device events time kernels
    blas_name: ClassVar[str] = "CPU BLAS"  # what ``torch.matmul`` runs on (the GEMM benchmarks' baseline)
    # tuning ranges (``portable-xy kernels tune``); None: the vendor cannot be tuned
    default_arch: ClassVar[str | None] = None
    tune_gemm_shapes: ClassVar[list[tuple[int, int]] | None] = None
    tune_ms: ClassVar[list[int] | None] = None
    tune_kv_tiles: ClassVar[list[int] | None] = None
    # AOT: the architectures ``kernels aot-report`` compiles for without a device
    aot_archs: ClassVar[tuple[str, ...]] = ()

    # -- presence and detection ------------------------------------------------------------------
    def is_available(self) -> bool:
        try:
            self.require()
        except RuntimeError:
            return False
        return True

    def require(self) -> None:
        """Raise a clear ``RuntimeError`` when the device is not there."""

    def detect(self) -> DeviceInfo:
        """The current device (call :meth:`require` first)."""
        raise NotImplementedError

    def arch_name(self, raw: Any) -> str | None:
        """The profile architecture name for a raw device identifier (a compute capability, an
        ISA name, a SoC name); ``None`` when no architecture file applies."""
        return None

    def shipped_arch_file(self, arch: str | None) -> Path | None:
        """The shipped ``profiles/<vendor>/<arch>.yaml``, or None when the vendor default applies."""
        if not arch:
            return None
        path = PROFILE_DIR / self.vendor / f"{arch}.yaml"
        return path if path.is_file() else None

    def check_triton(self) -> None:
        """Raise when the installed Triton cannot run this platform's kernels."""

    def default_dtype(self) -> torch.dtype:
        """The activation dtype of ``dtype="auto"``."""
        return torch.bfloat16

    # -- the device module ---------------------------------------------------------------------
    def device_module(self) -> ModuleType | None:
        """``torch.cuda``-like module of the device (``None`` on the CPU)."""
        return None

    def set_device(self, index: int) -> None:
        mod = self.device_module()
        if mod is not None:
            mod.set_device(index)

    def synchronize(self, device: torch.device | None = None) -> None:
        mod = self.device_module()
        if mod is not None:
            mod.synchronize(device)

    def mem_get_info(self, device: torch.device | None = None) -> tuple[int, int] | None:
        """``(free, total)`` bytes of device memory; ``None`` on the CPU."""
        mod = self.device_module()
        return None if mod is None else mod.mem_get_info(device)

    def empty_cache(self) -> None:
        mod = self.device_module()
        if mod is not None:
            mod.empty_cache()

    def graph_api(self) -> tuple[ModuleType, type]:
        """``(module, Graph class)``: the module whose ``graph``, ``graph_pool_handle``, ``Stream``,
        ``stream`` and ``current_stream`` capture graphs; a clear error without graph capture."""
        raise RuntimeError(f"no graph capture on device type {self.device_type!r} (use the eager static path)")

    def make_timer(self, warmup: int, reps: int) -> Callable[[Callable[[], Any]], float]:
        """``timer(fn) -> seconds``: the median of ``reps`` calls after ``warmup``, with device
        events where the device has them, else ``time.perf_counter``."""
        mod = self.device_module() if self.event_timer else None
        if mod is None:

            def cpu_timer(fn):
                for _ in range(warmup):
                    fn()
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                return statistics.median(times)

            return cpu_timer

        def timer(fn):
            for _ in range(warmup):
                fn()
            mod.synchronize()
            times = []
            for _ in range(reps):
                a, b = mod.Event(enable_timing=True), mod.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e-3)
            return statistics.median(times)

        return timer

    # -- compilation and tuning ----------------------------------------------------------------
    def triton_target(self, arch: str) -> Any:
        """Triton's ``GPUTarget`` for compiling ahead of time for ``arch`` without a device."""
        raise NotImplementedError(f"{self.name}: no ahead-of-time Triton target")

    def candidate_gemm_tiles(self, profile: Profile, arch: str | None) -> list[dict]:
        """GEMM tiles the tuner times on this vendor, within the on-chip limits of ``arch``."""
        return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32) for bm, bn in itertools.product((16, 32, 64), (32, 64))]

    # -- reports -------------------------------------------------------------------------------
    def environment(self, device: torch.device) -> dict[str, Any]:
        """Device name, driver and vendor library versions for benchmark reports (merged over the
        host's facts)."""
        return {}

    def device_properties(self, device: torch.device) -> dict[str, Any]:
        """Core count, compute capability / ISA and memory of the device, for the selfcheck report."""
        return {}

    def vendor_gemm(self, x: torch.Tensor, w: torch.Tensor) -> tuple[Callable[[], torch.Tensor], str]:
        """The vendor library's GEMM ``x @ w.T`` (the kernel benchmarks' baseline) and its name."""
        wt = w.t()
        return (lambda: torch.matmul(x, wt)), f"torch.matmul ({self.blas_name})"

    def vendor_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any, scale: float, gathered: list
    ) -> tuple[Callable[[], Any], str] | None:
        """The vendor library's attention over one step (``gathered``: per sequence ``(q, k, v)``
        with its KV gathered from the cache), or ``None`` to use torch SDPA per sequence."""
        return None
