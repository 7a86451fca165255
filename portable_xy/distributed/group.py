"""One rank's view of a tensor-parallel group: the collectives the model and the runner use.

Two torch.distributed groups back it: the default group on the device's backend (NCCL on CUDA,
HCCL on Ascend, gloo on CPU) for activations, and a gloo group on the CPU for the per-step
messages rank 0 sends (picklable objects, ``broadcast_object_list``). The control group waits
without a practical timeout, so workers can sit idle under a quiet server; a peer that exits
closes its sockets, which fails any pending collective at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

DEVICE_TIMEOUT = timedelta(minutes=30)  # activations: a rank may load its shard this much later
CONTROL_TIMEOUT = timedelta(days=365)  # per-step messages: workers wait for the next step this long
DIST_BACKENDS = {"cpu": "gloo", "interpret": "gloo", "cuda": "nccl", "npu": "hccl"}


class TensorParallelError(RuntimeError):
    """A tensor-parallel step failed (a worker died or raised, or rank 0 raised mid-step): the group
    is stopped and the engine cannot run further steps."""


class TPGroup:
    """Rank ``rank`` of ``size``. ``on_failure`` turns a failed collective into the error to raise
    (rank 0's executor names the worker that died); after it, every call raises that error."""

    def __init__(
        self, rank: int, size: int, cpu_group: Any, on_failure: Callable[[BaseException], BaseException] | None = None
    ) -> None:
        self.rank = rank
        self.size = size
        self.cpu_group = cpu_group
        self.on_failure = on_failure
        self.broken: BaseException | None = None
        # counters for benchmarks (eager steps; graph replays do not pass through Python)
        self.all_reduce_bytes = 0
        self.num_broadcasts = 0
        self.broadcast_s = 0.0

    @classmethod
    def create(cls, rank: int, size: int, on_failure=None) -> TPGroup:
        """After ``init_process_group``: add the gloo control group."""
        return cls(rank, size, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT), on_failure)

    def fail(self, cause: BaseException) -> BaseException:
        """Mark the group stopped by ``cause``; returns the error to raise."""
        if self.broken is None:
            self.broken = self.on_failure(cause) if self.on_failure else TensorParallelError(str(cause))
        return self.broken

    def check(self) -> None:
        if self.broken is not None:
            raise self.broken

    # ---- activations -------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns it."""
        self.all_reduce_bytes += x.numel() * x.element_size()
        dist.all_reduce(x)
        return x

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x [N, C]`` of every rank concatenated along dim 1 on rank 0 (``[N, size * C]``);
        ``None`` on the other ranks."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=1) if parts is not None else None

    def all_reduce_min(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t)

    # ---- control messages --------------------------------------------------------------------
    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0 sends ``obj``; every rank returns it."""
        t0 = time.perf_counter()
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        if self.rank == 0:
            self.num_broadcasts += 1
            self.broadcast_s += time.perf_counter() - t0
        return box[0]

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order), ``None`` elsewhere."""
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out
