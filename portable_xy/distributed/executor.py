"""Start, watch and stop a tensor-parallel group.

Two launches, one engine:

* **spawn** (the default): the engine process is rank 0 and starts ``size - 1`` worker processes
  with torch.multiprocessing's ``spawn``. Rank 0 runs a ``TCPStore`` on a free local port; the
  workers post a key when they reach the rendezvous, so a worker that dies before it is caught
  by polling its process instead of waiting out a timeout.
* **external** (``torchrun`` or any ``env://`` rendezvous: ``MASTER_ADDR``, ``MASTER_PORT``,
  ``RANK``, ``WORLD_SIZE`` set): every process runs the same program; rank 0 returns from the
  engine's constructor as the engine, the other ranks serve as workers inside it and leave the
  program (``SystemExit(0)``) when rank 0 shuts down.

Every rank then builds its :class:`~portable_xy.engine.model_runner.ModelRunner` (its shard, its
KV cache); the workers loop on rank 0's per-step messages. A worker that dies or raises closes its
sockets, rank 0's pending collective fails at once, and :meth:`TPExecutor.diagnose` turns that into
a :class:`TensorParallelError` naming the rank, its exit code or its traceback.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..backends.platforms import get_platform
from .group import DEVICE_TIMEOUT, TensorParallelError, TPGroup

if TYPE_CHECKING:
    from ..config import EngineConfig

# what a worker rank runs once its group is up: build its model runner and serve rank 0's steps
# (a module-level function, so that it pickles by reference into spawned workers)
ServeFn = Callable[["EngineConfig", TPGroup], None]

START_TIMEOUT_S = 600.0  # for every worker to start Python and reach the rendezvous
STOP_TIMEOUT_S = 10.0  # for workers to leave after the shutdown message, before they are killed
READY_KEY = "portable_xy/ready/{}"


def external_launch() -> bool:
    """Whether this process was started by ``torchrun`` (or any launcher setting ``RANK`` and
    ``WORLD_SIZE``) rather than by the engine."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_threads(ranks_here: int) -> int:
    """CPU threads each of ``ranks_here`` ranks sharing this machine gets: an equal share of this
    process's threads (``torch.get_num_threads``, i.e. ``OMP_NUM_THREADS`` or the cores it may use)."""
    return max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0))) // ranks_here)


def setup_rank(config: EngineConfig, local_rank: int) -> None:
    """Per-process settings of a rank: its accelerator, or its share of the CPU threads."""
    platform = get_platform(config.backend)
    platform.set_device(local_rank)
    if platform.host_threads:
        from ..backends import cpu_native

        here = int(os.environ.get("LOCAL_WORLD_SIZE", config.tensor_parallel_size))  # torchrun: ranks on this node
        cpu_native.set_num_threads(rank_threads(here))


def _watch_parent(parent: int) -> None:
    """A spawned worker leaves when its engine process is gone, whatever it is waiting on."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker_main(config: EngineConfig, serve: ServeFn, rank: int, size: int, port: int, errors) -> None:
    """Entry point of a spawned worker: rendezvous, then ``serve`` (build the runner, serve steps)."""
    code = 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it stops the workers
    try:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
        setup_rank(config, rank)
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=DEVICE_TIMEOUT)
        store.set(READY_KEY.format(rank), "1")
        dist.init_process_group(get_platform(config.backend).dist_backend, store=store, rank=rank, world_size=size,
                                timeout=DEVICE_TIMEOUT)  # fmt: skip
        serve(config, TPGroup.create(get_platform(config.backend), rank, size))
    except BaseException:
        code = 1
        errors.put((rank, traceback.format_exc()))
        errors.close()
        errors.join_thread()  # the message is out before the sockets close
    finally:
        if code == 0 and dist.is_initialized():
            dist.destroy_process_group()
    os._exit(code)


class TPExecutor:
    """Rank 0's side of the group: :attr:`group` for the runner, the worker processes, teardown."""

    def __init__(self, config: EngineConfig, serve: ServeFn) -> None:
        self.size = config.tensor_parallel_size
        self.procs: list = []
        self.errors = None
        self.reports: dict[int, str] = {}  # rank -> traceback of a worker that raised
        self.stopped = False
        platform = get_platform(config.backend)
        self._threads = torch.get_num_threads() if platform.host_threads else None
        backend = platform.dist_backend
        if dist.is_initialized():
            raise RuntimeError(
                "a torch.distributed process group is already initialised in this process (another "
                "tensor-parallel engine?): shut it down first (LLM.shutdown())"
            )
        if external_launch():
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            if world != self.size:
                raise ValueError(
                    f"tensor_parallel_size={self.size} but the launcher started WORLD_SIZE={world} processes"
                )
            setup_rank(config, int(os.environ.get("LOCAL_RANK", rank)))
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=DEVICE_TIMEOUT)
            if rank != 0:
                try:
                    serve(config, TPGroup.create(platform, rank, world))
                finally:
                    dist.destroy_process_group()
                raise SystemExit(0)
        else:
            self._spawn(config, serve, backend)
        try:
            self.group = TPGroup.create(platform, 0, self.size, self.diagnose)
        except BaseException:
            self.shutdown(wait_s=0.0)
            raise

    def _spawn(self, config: EngineConfig, serve: ServeFn, backend: str) -> None:
        port = free_port()
        store = dist.TCPStore("127.0.0.1", port, self.size, is_master=True, wait_for_workers=False,
                              timeout=DEVICE_TIMEOUT)  # fmt: skip
        ctx = mp.get_context("spawn")
        self.errors = ctx.Queue()
        for rank in range(1, self.size):
            p = ctx.Process(target=_worker_main, args=(config, serve, rank, self.size, port, self.errors), daemon=True,
                            name=f"portable_xy-tp{rank}")  # fmt: skip
            p.start()
            self.procs.append(p)
        setup_rank(config, 0)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            for rank, p in enumerate(self.procs, 1):
                while not store.check([READY_KEY.format(rank)]):
                    if not p.is_alive() or time.monotonic() > deadline:
                        err = self.diagnose(RuntimeError("did not reach the rendezvous"))
                        raise TensorParallelError(
                            f"{err} (workers re-import the main script: one that starts an LLM must do so "
                            f"under `if __name__ == '__main__':`)"
                        ) from None
                    time.sleep(0.02)
            dist.init_process_group(backend, store=store, rank=0, world_size=self.size, timeout=DEVICE_TIMEOUT)
        except BaseException:
            self.shutdown(wait_s=0.0)
            raise

    def diagnose(self, cause: BaseException) -> TensorParallelError:
        """The error for a failed step: which worker died (exit code / signal) or raised (its
        traceback), or, with every worker alive, rank 0's own ``cause``. Stops the group."""
        lines = self.worker_failures()
        if not lines and not self.procs:  # launched by torchrun: the other ranks are not ours to watch
            lines = [f"a collective failed ({type(cause).__name__}: {cause}); a peer rank may have died, see its log"]
        elif not lines:
            lines = [f"rank 0 raised {type(cause).__name__}: {cause}"]
        self.shutdown(wait_s=0.0)
        return TensorParallelError(
            "tensor-parallel group stopped: " + "; ".join(lines) + "; build a new engine to continue"
        )

    def worker_failures(self, wait_s: float = 5.0) -> list[str]:
        """One line per worker that died or raised, waiting up to ``wait_s`` for a failing worker
        to exit (it exits right after reporting)."""
        deadline = time.monotonic() + wait_s
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        while self.errors is not None and not self.stopped:
            try:
                rank, tb = self.errors.get(timeout=0.2)
            except (queue.Empty, OSError, EOFError, ValueError):
                break
            self.reports[rank] = tb
        lines = []
        for rank, p in enumerate(self.procs, 1):
            if rank in self.reports:
                tb = self.reports[rank].rstrip().splitlines()
                lines.append(f"rank {rank} (pid {p.pid}) raised {tb[-1]}\n" + "\n".join(tb[-12:]))
            elif p.exitcode is not None:
                how = f"signal {signal.Signals(-p.exitcode).name}" if p.exitcode < 0 else f"exit code {p.exitcode}"
                lines.append(f"rank {rank} (pid {p.pid}) died ({how})")
        return lines

    def shutdown(self, wait_s: float = STOP_TIMEOUT_S) -> None:
        """Wait ``wait_s`` for the workers to leave (the caller has sent the stop message where the
        group still works), kill any that linger, destroy the process group, give rank 0 its
        threads back. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        deadline = time.monotonic() + wait_s
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.errors is not None:
            self.errors.close()
            self.errors.cancel_join_thread()
        if self._threads is not None:
            from ..backends import cpu_native

            cpu_native.set_num_threads(self._threads)
