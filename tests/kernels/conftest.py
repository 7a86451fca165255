"""Shared helpers for the kernel tests, which run under the Triton interpreter on CPU tensors.

``TRITON_INTERPRET=1`` must be set before Triton is first imported (Triton decides at import time
whether ``@triton.jit`` functions are interpreted); it is set here and in ``tests/conftest.py``.
The interpreter has no bfloat16: kernel tests use fp32 and fp16.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with values no correct kernel leaves behind (NaN for floats, -1 for
    integers) and return it: an output element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan") if t.is_floating_point() else -1)


@pytest.fixture(scope="session")
def poison():
    """The ``poison(tensor) -> tensor`` helper (fills outputs with NaN / -1 before a run)."""
    return _poison


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator with a fresh seed per test run (``PXY_TEST_SEED`` pins it); the seed is
    printed so a failure can be replayed."""
    seed = int(os.environ.get("PXY_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"{request.node.nodeid}: PXY_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def interpreted():
    """``interpreted(kernel) -> bool``: whether a ``@triton.jit`` function runs under the
    interpreter in this process (kernel modules imported before TRITON_INTERPRET was set do not)."""
    return lambda kernel: type(kernel).__name__ == "InterpretedFunction"
