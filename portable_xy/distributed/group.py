"""One rank's view of a tensor-parallel group: the collectives the model and the runner use.

Two torch.distributed groups back it: the default group on the platform's backend (NCCL on CUDA,
RCCL on ROCm, HCCL on Ascend, gloo on CPU) for activations, and a gloo group on the CPU for the per-step
messages rank 0 sends (pickled objects in a fixed buffer, ``broadcast``). The control group waits
without a practical timeout, so workers can sit idle under a quiet server; a peer that exits
closes its sockets, which fails any pending collective at once.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..backends.platforms import Platform

DEVICE_TIMEOUT = timedelta(minutes=30)  # activations: a rank may load its shard this much later
CONTROL_TIMEOUT = timedelta(days=365)  # per-step messages: workers wait for the next step this long
# torch 2.13 renamed all_gather_into_tensor (the older name warns there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
MESSAGE_BYTES = 16384  # the per-step message buffer: a decode step of a few dozen sequences fits


class TensorParallelError(RuntimeError):
    """A tensor-parallel step failed (a worker died or raised, or rank 0 raised mid-step): the group
    is stopped and the engine cannot run further steps."""


class TPGroup:
    """Rank ``rank`` of ``size``. ``on_failure`` turns a failed collective into the error to raise
    (rank 0's executor names the worker that died); after it, every call raises that error."""

    def __init__(
        self,
        rank: int,
        size: int,
        cpu_group: Any,
        platform: Platform,
        on_failure: Callable[[BaseException], BaseException] | None = None,
    ) -> None:
        self.rank = rank
        self.platform = platform
        self.size = size
        self.cpu_group = cpu_group
        self.on_failure = on_failure
        self.broken: BaseException | None = None
        self.backend = dist.get_backend()  # the activations' backend (the platform's, or gloo)
        self._message = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
        # counters for benchmarks (eager steps; graph replays do not pass through Python)
        self.all_reduce_bytes = 0
        self.all_reduce_s = 0.0
        self.num_broadcasts = 0
        self.broadcast_s = 0.0

    @classmethod
    def create(cls, platform: Platform, rank: int, size: int, on_failure=None) -> TPGroup:
        """After ``init_process_group``: add the gloo control group."""
        return cls(rank, size, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT), platform, on_failure)

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
        """Sum ``x`` over the ranks, in place; returns it. On gloo as an all-gather and a local sum
        in rank order (fp32): one exchange instead of gloo's multi-round all-reduce, which costs
        about three times as long for the small activations of a step, and the same bits on every
        rank."""
        self.all_reduce_bytes += x.numel() * x.element_size()
        t0 = time.perf_counter()
        if self.backend != "gloo":
            dist.all_reduce(x)
        else:
            parts = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
            _all_gather_single(parts, x.contiguous())
            x.copy_(parts.view(self.size, *x.shape).sum(0, dtype=torch.float32))
        self.all_reduce_s += time.perf_counter() - t0  # host time: on a GPU, the launch only
        return x

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x [N, C]`` of every rank concatenated along dim 1 on rank 0 (``[N, size * C]``);
        ``None`` on the other ranks."""
        x = x.contiguous()
        if not self.platform.dist_gather:  # all-gather where the collective library lacks gather
            parts = x.new_empty((self.size * x.shape[0], x.shape[1]))
            _all_gather_single(parts, x)
            return torch.cat(parts.chunk(self.size), dim=1) if self.rank == 0 else None
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=1) if parts is not None else None

    def warm_up(self, device: torch.device) -> None:
        """One all-reduce on ``device`` so the device communicator exists before any graph
        capture that contains all-reduces."""
        dist.all_reduce(torch.zeros(1, device=device))

    def all_reduce_min(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t)

    # ---- control messages --------------------------------------------------------------------
    @staticmethod
    def encode(obj: Any) -> bytes:
        """The pickle :meth:`broadcast_object` sends (raises here, before anything is sent, for an
        object that does not pickle)."""
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def broadcast_object(self, data: bytes | None = None) -> Any:
        """Rank 0 sends ``data`` (from :meth:`encode`); every rank returns the object. One
        broadcast of a fixed :data:`MESSAGE_BYTES` buffer (8-byte length, then the pickle) for a
        typical step; a larger pickle sends its remainder in a second one."""
        t0 = time.perf_counter()
        buf, head = self._message, MESSAGE_BYTES - 8
        if self.rank == 0:
            n = len(data)
            buf[:8] = torch.tensor([n], dtype=torch.int64).view(torch.uint8)
            buf[8 : 8 + min(n, head)] = torch.frombuffer(bytearray(data[:head]), dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.cpu_group)
        n = int(buf[:8].view(torch.int64))
        if n > head:
            rest = torch.empty(n - head, dtype=torch.uint8)
            if self.rank == 0:
                rest.copy_(torch.frombuffer(bytearray(data[head:]), dtype=torch.uint8))
            dist.broadcast(rest, src=0, group=self.cpu_group)
        if self.rank == 0:
            self.num_broadcasts += 1
            self.broadcast_s += time.perf_counter() - t0
            return None
        body = buf[8 : 8 + min(n, head)].numpy().tobytes()
        return pickle.loads(body + rest.numpy().tobytes() if n > head else body)

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order), ``None`` elsewhere."""
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.cpu_group)
        return out
