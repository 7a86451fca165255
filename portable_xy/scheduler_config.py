"""The scheduler's settings (``engine/scheduler.py`` reads them; ``EngineConfig.scheduler_config``
builds them), in a module of their own so that the configuration imports nothing of the engine."""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("tokenwise", "prefill_first", "decode_first")
ORDERS = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # the step's token budget B
    max_num_seqs: int = 256
    policy: str = "tokenwise"
    scheduling_policy: str = "fcfs"  # or "priority": lower ``priority`` first, then arrival
    decode_reserve: int | None = None  # most tokens D/V stages take ahead of prefill (None: all)
    max_num_partial_prefills: int | None = None  # most prefill stages in one step (None: any)
    chunk_align: int = 1
    num_speculative_tokens: int = 0  # most drafts a decoding sequence verifies per step (0: none)
    max_model_len: int | None = None  # longest sequence (None: no limit)

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "chunk_align"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"num_speculative_tokens must be a non-negative int, got {k!r}")
        for name in ("decode_reserve", "max_num_partial_prefills", "max_model_len"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 1):
                raise ValueError(f"{name} must be None or a positive int, got {val!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"scheduler policy {self.policy!r} is not one of {POLICIES}")
        if self.scheduling_policy not in ORDERS:
            raise ValueError(f"scheduling_policy {self.scheduling_policy!r} is not one of {ORDERS}")
