"""Every environment variable portable_xy reads or sets, in one place.

Each is read when its function is called (not at import), so a test or a launcher may change it
before use.

=============================  ==============================================================
variable                       meaning
=============================  ==============================================================
``PORTABLE_XY_CACHE``          cache folder: the built C library, GGUF tokenizers
                               (default ``~/.cache/portable_xy``)
``PORTABLE_XY_PROFILE_DIR``    tuned profiles written by ``portable-xy kernels tune``
                               (default ``~/.cache/portable_xy/profiles``)
``PORTABLE_XY_NATIVE``         ``0``: the cpu backend stays on torch ops (no C library)
``PORTABLE_XY_AMX``            ``0``: the cpu backend does not use its AMX GEMMs
``PORTABLE_XY_AOT_TRACEBACK``  set: ``kernels aot-report`` prints a compile error's traceback
``TRITON_INTERPRET``           ``1``: Triton kernels run in the CPU interpreter (read by Triton
                               itself when it is imported; the ``interpret`` backend sets it)
``CC``                         the C compiler that builds ``backends/cpu_native.c`` (``cc``)
=============================  ==============================================================
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")


def cache_root() -> Path:
    """``$PORTABLE_XY_CACHE``, else ``~/.cache/portable_xy``."""
    return Path(os.environ.get("PORTABLE_XY_CACHE", Path.home() / ".cache" / "portable_xy"))


def tuned_profile_dir() -> Path:
    """Where tuned profiles live: ``$PORTABLE_XY_PROFILE_DIR``, else ``~/.cache/portable_xy/profiles``."""
    return Path(os.environ.get("PORTABLE_XY_PROFILE_DIR", Path.home() / ".cache" / "portable_xy" / "profiles"))


def native_enabled() -> bool:
    """False when ``PORTABLE_XY_NATIVE=0``."""
    return os.environ.get("PORTABLE_XY_NATIVE", "1") != "0"


def amx_enabled() -> bool:
    """False when ``PORTABLE_XY_AMX=0``."""
    return os.environ.get("PORTABLE_XY_AMX", "1") != "0"


def aot_traceback() -> bool:
    return bool(os.environ.get("PORTABLE_XY_AOT_TRACEBACK"))


def c_compiler() -> str:
    return os.environ.get("CC", "cc")


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def set_triton_interpret(on: bool) -> None:
    """Set (``TRITON_INTERPRET=1``) or clear the variable; only effective before Triton is imported."""
    if on:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
