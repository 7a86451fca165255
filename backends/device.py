"""Device detection: which device a backend runs on, its architecture name and its profile.

This is the one place that turns a CUDA compute capability or an Ascend SoC name into the
architecture name used for profile files; the backends, the tuner and the benchmarks all call it.

Architecture names and their profile files (``profiles/<vendor>/<arch>.yaml``):

* CUDA: ``sm<major><minor>`` (``sm80``, ``sm90``, ``sm89``...).
* Ascend: ``910b`` for ``Ascend910B*``, ``910_93`` for ``Ascend910_93*`` and ``Ascend910C*`` (the
  A3 parts), otherwise the SoC name lower-cased without its ``Ascend`` prefix.

An architecture without a shipped file of its own falls back to ``<vendor>/default.yaml``; a tuned
file for it (``portable-xy kernels tune``) is still layered on top, under its own name. So a
tuning always lands in the file the backend reads on the same device.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from .profile import PROFILE_DIR, Profile, load_profile

# backend name -> profile vendor
VENDORS = {"cpu": "cpu", "interpret": "interpret", "cuda": "cuda", "npu": "ascend"}
# profile key ``num_cores_from`` -> what the detected core count means
CORE_SOURCES = {"cuda": "sm_count", "npu": "num_aicore", "cpu": "cpu_threads"}
# opt-in shared memory per thread block of CUDA architectures (bytes)
CUDA_SMEM_PER_BLOCK = {"sm75": 65536, "sm80": 166912, "sm86": 101376, "sm89": 101376, "sm90": 232448}


def cuda_arch(capability: int | tuple[int, int]) -> str:
    """``90`` or ``(9, 0)`` -> ``sm90``."""
    if isinstance(capability, tuple):
        capability = capability[0] * 10 + capability[1]
    return f"sm{int(capability)}"


def ascend_arch(soc: str) -> str | None:
    """``Ascend910B3`` -> ``910b``; ``Ascend910_9382`` / ``Ascend910C`` -> ``910_93``; other names
    lower-cased without the ``Ascend`` prefix; ``None`` for an empty name."""
    s = str(soc).strip().lower().replace("ascend", "")
    if s.startswith(("910_93", "910c")):
        return "910_93"
    if s.startswith("910b"):
        return "910b"
    return s or None


def shipped_arch_file(vendor: str, arch: str | None) -> Path | None:
    """The shipped ``profiles/<vendor>/<arch>.yaml``, or None when the vendor default applies."""
    if not arch:
        return None
    path = PROFILE_DIR / vendor / f"{arch}.yaml"
    return path if path.is_file() else None


@dataclass(frozen=True)
class DeviceInfo:
    """What :func:`detect` found: the backend, its torch device, the device's name, its architecture
    name (``None``: no architecture-specific profile applies) and its core count (``None``: the
    profile's)."""

    backend: str
    device: torch.device
    name: str
    arch: str | None = None
    num_cores: int | None = None

    @property
    def vendor(self) -> str:
        return VENDORS[self.backend]

    def profile(self, tuned: bool = True) -> Profile:
        """The resolved profile for this device (see the module doc), with the detected core count
        where the profile's ``num_cores_from`` asks for it."""
        profile = load_profile(self.vendor, self.arch, tuned=tuned)
        if self.num_cores and profile.data.get("num_cores_from") == CORE_SOURCES.get(self.backend):
            profile = profile.with_num_cores(self.num_cores)
        return profile


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU has native bf16 dot products (AVX512-BF16 or AMX), from ``/proc/cpuinfo``."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def require(backend: str) -> None:
    """Raise a clear error when ``backend``'s device is not there (without importing Triton)."""
    if backend == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("backend 'cuda' needs an NVIDIA GPU visible to torch (torch.cuda.is_available() is False)")
    if backend == "npu":
        try:
            import torch_npu  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "backend 'npu' needs torch_npu (Ascend's PyTorch plugin) and triton-ascend: "
                "pip install 'portable-xy[ascend]' on a machine with CANN; torch_npu could not be imported "
                f"({e})"
            ) from e
        if not torch.npu.is_available():
            raise RuntimeError("backend 'npu': torch_npu is installed but no NPU is available")


def _detect_cuda() -> DeviceInfo:
    dev = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    return DeviceInfo("cuda", dev, props.name, cuda_arch((props.major, props.minor)), props.multi_processor_count)


def _detect_npu() -> DeviceInfo:
    index = torch.npu.current_device()
    name = torch.npu.get_device_name(index)
    cores = None
    try:  # triton-ascend's driver knows the AI-core count; the profile's is the fallback
        import triton

        cores = int(triton.runtime.driver.active.utils.get_device_properties(index)["num_aicore"])
    except Exception:  # noqa: BLE001
        pass
    return DeviceInfo("npu", torch.device("npu", index), name, ascend_arch(name), cores)


def npu_available() -> bool:
    try:
        require("npu")
    except RuntimeError:
        return False
    return True


def detect(backend: str) -> DeviceInfo:
    """The device of ``backend`` (``cpu``, ``interpret``, ``cuda``, ``npu``); a clear error when it
    is not there."""
    require(backend)
    if backend == "cuda":
        return _detect_cuda()
    if backend == "npu":
        return _detect_npu()
    if backend == "cpu":
        return DeviceInfo("cpu", torch.device("cpu"), cpu_name(), None, torch.get_num_threads())
    if backend == "interpret":
        return DeviceInfo("interpret", torch.device("cpu"), f"Triton interpreter ({platform.machine()} CPU)")
    raise ValueError(f"backend={backend!r} is not one of {sorted(VENDORS)}")


def resolve_backend_name(name: str) -> str:
    """``auto`` picks cuda, then npu, then cpu; other names are checked."""
    choices = ("auto", *VENDORS)
    if name not in choices:
        raise ValueError(f"backend={name!r} is not one of {list(choices)}")
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if npu_available():
        return "npu"
    return "cpu"
