"""The timer the tuner and the benchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def make_timer(device_type: str, warmup: int, reps: int) -> Callable[[Callable[[], Any]], float]:
    """``timer(fn) -> seconds``: the median of ``reps`` calls after ``warmup``, timed with device
    events on ``cuda`` / ``npu`` and ``time.perf_counter`` elsewhere."""
    if device_type in ("cuda", "npu"):
        import torch

        mod = torch.cuda if device_type == "cuda" else torch.npu  # torch.npu exists once torch_npu is imported

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
