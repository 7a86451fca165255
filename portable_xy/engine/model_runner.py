"""The model runner: one model's weights, its paged KV cache and its decode graphs, and the
forward pass of a step (the scheduler's stages in, fp32 logits out).

It owns everything that lives on the device: it builds the backend (unless given one), loads the
weights, sizes and allocates the KV cache, and captures decode graphs where the backend has them.
A runner is built from an :class:`~portable_xy.config.EngineConfig` alone, so another process can
rebuild the same one from a pickled config.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..backends import AttnMetadata, Backend, get_backend
from ..backends.graphs import make_decode_graph_runner
from ..models.config import ModelConfig
from ..models.loader import open_weights
from ..models.registry import MODELS
from .scheduler import SchedulerOutput, Stage
from .sequence import Sequence

if TYPE_CHECKING:
    from ..config import EngineConfig
    from ..distributed.group import TPGroup

# on CPU, when neither num_kv_blocks nor kv_cache_memory_gb is set: room for max_num_seqs sequences of
# max_model_len tokens, up to this many bytes
DEFAULT_KV_CACHE_BYTES = 2**30


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on CPU from calloc'd memory, so the OS commits its pages (and the process's
    RSS grows) only as KV blocks are first written."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = torch.empty((), dtype=dtype).element_size()
    nbytes = size * int(np.prod(shape))
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def kv_bytes_per_block(
    config: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None
) -> int:
    """Bytes of K and V for ``block_size`` tokens over all layers, for ``num_kv_heads`` KV heads
    (default: all of the model's; a tensor-parallel rank holds fewer)."""
    elem = torch.empty((), dtype=dtype).element_size()
    heads = config.num_kv_heads if num_kv_heads is None else num_kv_heads
    return 2 * config.num_layers * block_size * heads * config.head_dim * elem


@dataclass
class StageInput:
    """``token_ids`` fed at positions ``start, start+1, ...`` of ``seq`` (whose block table already
    covers them); logits are returned for the last ``num_logits`` of them."""

    seq: Sequence
    start: int
    token_ids: list[int]
    num_logits: int


def stage_input(st: Stage) -> StageInput:
    """A scheduled stage's tokens: its slice of the sequence, plus the drafts of a verify stage."""
    seq = st.seq
    toks = seq.token_ids[st.start : st.start + st.num_tokens]
    if st.kind == "V":
        toks = toks + seq.draft_token_ids
    return StageInput(seq, st.start, toks, st.num_logits)


@dataclass
class StepInput:
    """Everything a rank needs to run one forward pass, as plain lists (rank 0 sends it to the
    workers once per step): the tokens, their positions and cache slots, per stage its query start,
    KV length, block table and sequence id, the rows whose logits are wanted, and the KV block
    copies to do first."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    seq_ids: list[int]
    logit_rows: list[int]
    block_copies: list[tuple[int, int]]


class ModelRunner:
    """Weights, KV cache and decode graphs of one model (the target, or a draft model with
    ``model_path``, sharing the target's ``backend`` and block layout via ``num_kv_blocks``).

    Under tensor parallelism (``group``) every rank builds one, holding its shard and a KV cache for
    its KV heads. Rank 0's :meth:`execute` / :meth:`forward` send the step's :class:`StepInput` to
    the workers, which run the same pass from :meth:`serve`; rank 0 gets the gathered logits."""

    def __init__(
        self,
        config: EngineConfig,
        backend: Backend | None = None,
        model_path: Path | None = None,
        num_kv_blocks: int | None = None,
        group: TPGroup | None = None,
    ) -> None:
        self.config = config
        self.group = group
        self.backend = backend if backend is not None else get_backend(config.backend)
        weights = open_weights(model_path or config.model_path)
        model_config = weights.config
        model_cls = MODELS[model_config.architecture].model_class()
        rank = (group.rank, group.size) if group else (0, 1)
        shard = model_cls.shard_plan.make(model_config, *rank, config.enable_expert_parallel)
        self.model = model_cls(model_config, weights, self.backend, config.dtype, config.max_model_len,
                               shard, group, config.quantization)  # fmt: skip
        for kind, names in self.model.dequantized.items():
            print(f"portable_xy: {len(names)} GEMM weight(s) stored as {kind} dequantized to "
                  f"{str(config.dtype).removeprefix('torch.')} (kept quantized: Q4_0, Q4_1, Q8_0): "
                  f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}", file=sys.stderr)  # fmt: skip
        del weights
        self.num_heads, self.num_kv_heads = shard.num_heads, shard.num_kv_heads
        self.block_size = config.block_size
        n = num_kv_blocks or self._num_kv_blocks()
        self.num_kv_blocks = n
        if group is not None:
            self.num_kv_blocks = group.all_reduce_min(n)  # one block layout on every rank
            group.warm_up(self.backend.device)
        c = model_config
        shape = (self.num_kv_blocks, self.block_size, self.num_kv_heads, c.head_dim)
        dev = self.backend.device
        self.kv_caches = [
            (_zeros(shape, config.dtype, dev), _zeros(shape, config.dtype, dev)) for _ in range(c.num_layers)
        ]
        self.graphs = make_decode_graph_runner(
            self.backend, self._hidden, self.num_heads, self.num_kv_heads, self.block_size, config.max_model_len,
            config.enforce_eager,
        )  # fmt: skip

    def _num_kv_blocks(self) -> int:
        """``num_kv_blocks``, else ``kv_cache_memory_gb``, else on a GPU / NPU
        ``gpu_memory_utilization`` of its memory minus what is in use, else (CPU) room for
        ``max_num_seqs`` sequences of ``max_model_len`` tokens, at most 1 GiB; at least one
        ``max_model_len`` sequence must fit. Per rank: a shard's blocks hold its KV heads only."""
        cfg = self.config
        per_block = kv_bytes_per_block(self.model.config, cfg.block_size, cfg.dtype, self.num_kv_heads)
        mem = self.backend.mem_get_info()
        if cfg.num_kv_blocks is not None:
            n = cfg.num_kv_blocks
        elif cfg.kv_cache_memory_gb is not None:
            n = max(1, int(cfg.kv_cache_memory_gb * 2**30 // per_block))
        elif mem is not None:
            free, total = mem
            n = max(1, int((free - (1 - cfg.gpu_memory_utilization) * total) // per_block))
        else:
            want = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.block_size)
            n = max(1, min(want, DEFAULT_KV_CACHE_BYTES // per_block))
        need = -(-cfg.max_model_len // cfg.block_size)
        if n < need:
            raise ValueError(
                f"num_kv_blocks={n} cannot hold one max_model_len={cfg.max_model_len} sequence "
                f"({need} blocks of {cfg.block_size} tokens); raise the KV budget or lower max_model_len"
            )
        return n

    def _hidden(self, input_ids: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        return self.model.forward(input_ids, meta, self.kv_caches)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks ``src -> dst`` in every layer (copy-on-write prefix reuse), in order."""
        for src, dst in pairs:
            for k_cache, v_cache in self.kv_caches:
                k_cache[dst].copy_(k_cache[src])
                v_cache[dst].copy_(v_cache[src])

    def execute(self, batch: SchedulerOutput) -> torch.Tensor:
        """Run a scheduled step: its pending block copies, then its stages. Returns the fp32 logits
        of each stage's ``num_logits`` rows, stage after stage."""
        return self.forward([stage_input(st) for st in batch.stages], batch.block_copies)

    def forward(self, inputs: list[StageInput], block_copies: list[tuple[int, int]] = ()) -> torch.Tensor:
        """Do ``block_copies``, run the stages; returns fp32 logits ``[sum(num_logits), V]`` in input
        order (on every rank of a tensor-parallel group at once)."""
        return self._call("run", self.step_input(inputs, list(block_copies)))

    def step_input(self, inputs: list[StageInput], block_copies: list[tuple[int, int]]) -> StepInput:
        """The stages' token table as plain lists."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        rows: list[int] = []
        for inp in inputs:
            n, table = len(inp.token_ids), inp.seq.block_table
            ids.extend(inp.token_ids)
            for pos in range(inp.start, inp.start + n):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            starts.append(starts[-1] + n)
            seq_lens.append(inp.start + n)
            rows.extend(range(starts[-1] - inp.num_logits, starts[-1]))
        max_blocks = max(len(inp.seq.block_table) for inp in inputs)
        tables = [inp.seq.block_table + [0] * (max_blocks - len(inp.seq.block_table)) for inp in inputs]
        seq_ids = [inp.seq.seq_id for inp in inputs]
        return StepInput(ids, positions, slots, starts, seq_lens, tables, seq_ids, rows, block_copies)

    def metadata(self, step: StepInput) -> tuple[torch.Tensor, AttnMetadata, torch.Tensor]:
        """Token ids, the token table and the logit rows as tensors on the device."""
        dev = self.backend.device
        starts = step.query_start_loc
        meta = AttnMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(step.seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(step.block_tables, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(step.slots, dtype=torch.long, device=dev),
            positions=torch.tensor(step.positions, dtype=torch.long, device=dev),
            query_lens_cpu=[b - a for a, b in zip(starts, starts[1:])],
            seq_lens_cpu=step.seq_lens,
            seq_ids=step.seq_ids,
        )
        row_idx = torch.tensor(step.logit_rows, dtype=torch.long, device=dev)
        return torch.tensor(step.token_ids, dtype=torch.long, device=dev), meta, row_idx

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor | None:
        """One forward pass on this rank; the logits (``None`` on tensor-parallel workers)."""
        self.copy_blocks(step.block_copies)
        input_ids, meta, rows = self.metadata(step)
        c = self.model.config
        if self.graphs is not None and self.graphs.can_run(meta):  # decode-only: padded to a graph bucket
            hidden = self.graphs.forward(input_ids, meta)
        else:
            self.backend.prepare(meta, self.num_heads, self.num_kv_heads, c.head_dim)
            hidden = self._hidden(input_ids, meta)
        if rows.numel() == 0:
            return hidden.new_empty((0, c.vocab_size), dtype=torch.float32)
        return self.model.logits(hidden[rows])

    # ---- tensor parallelism -----------------------------------------------------------------
    def _call(self, method: str | Callable, *args: Any, gather: bool = False) -> Any:
        """Run ``method`` (a name, or a function taking the runner first) on this runner and, under
        tensor parallelism, on every worker's at the same time; with ``gather`` the list of every
        rank's result, else rank 0's. A failure after the message went out stops the group
        (:class:`~portable_xy.distributed.TensorParallelError`)."""
        fn = self._method(method)
        if self.group is None:
            out = fn(*args)
            return [out] if gather else out
        self.group.check()
        message = self.group.encode((method, args, gather))  # an unpicklable call fails here, harmlessly
        try:
            self.group.broadcast_object(message)
            out = fn(*args)
            return self.group.gather_object(out) if gather else out
        except BaseException as e:
            err = self.group.fail(e)
            if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: the group is stopped
                raise
            raise err from e

    def _method(self, method: str | Callable) -> Callable:
        """This runner's method ``method``, or the function ``method`` bound to this runner."""
        return getattr(self, method) if isinstance(method, str) else functools.partial(method, self)

    def collective_rpc(self, method: str | Callable, args: tuple = ()) -> list[Any]:
        """``method(*args)`` on every rank's runner (a name, or a picklable function taking the
        runner first); the results in rank order."""
        return self._call(method, *args, gather=True)

    def serve(self) -> None:
        """A tensor-parallel worker's loop: run rank 0's calls until it sends ``None``."""
        while True:
            method, args, gather = self.group.broadcast_object()
            if method is None:
                return
            out = self._method(method)(*args)
            if gather:
                self.group.gather_object(out)

    def shutdown(self) -> None:
        """Tell the workers to leave (rank 0 of a working group; otherwise nothing to do)."""
        if self.group is not None and self.group.rank == 0 and self.group.broken is None:
            try:
                self.group.broadcast_object(self.group.encode((None, (), False)))
            except RuntimeError as e:
                self.group.fail(e)


def serve_rank(config: EngineConfig, group: TPGroup) -> None:
    """A worker rank of a tensor-parallel group: build its runner, then run rank 0's calls until it
    says stop (what ``distributed/executor.py`` runs in each worker)."""
    ModelRunner(config, group=group).serve()
