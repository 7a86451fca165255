"""Static-shape decode steps, replayed from CUDA graphs (``cuda``) or NPU graphs (``npu``).

A decode-only step (every stage has query length 1) of ``n`` sequences is padded to the smallest
*bucket* ``B >= n`` of the profile's ``graphs.decode_buckets``. Every tensor the forward pass reads
then has a shape that depends on ``B`` only, and lives in one set of static buffers (views of the
largest bucket's):

==================  ===================  =================================================
buffer              shape                padded rows (``n <= i < B``)
==================  ===================  =================================================
``input_ids``       int64 ``[B]``        token 0
``positions``       int64 ``[B]``        0
``slot_mapping``    int64 ``[B]``        -1: never writes the KV cache
``query_start_loc`` int32 ``[B + 1]``    ``arange(B + 1)`` (constant)
``seq_lens``        int32 ``[B]``        1 (attends to column 0 of block 0: finite, unused)
``block_tables``    int32 ``[B, W]``     0
==================  ===================  =================================================

``W`` is ``graphs.max_blocks_per_seq`` (0: enough blocks for ``max_model_len``). The attention
plan is the backend's fixed plan for ``B`` (``Backend.plan_decode``; Meta-Attention: a task table
and split-KV factor fixed per bucket, KV pieces cut from the run-time ``seq_lens``). Rows never
interact (GEMMs, norms, RoPE are row-wise; attention is per stage), so padded rows cannot change
real rows.

A step copies its inputs into the buffers, then replays the bucket's graph (captured on the
bucket's first step, after an eager warm-up run; all graphs share one memory pool) or, in eager
mode, runs the same forward on the same buffers without capture -- the path the CPU tests run
under the Triton interpreter. The output ``[B, H]`` is the graph's static tensor: read it before
the next step.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable
from types import ModuleType

import torch

from .base import AttnMetadata, Backend
from .platforms import platform_for_device

Forward = Callable[[torch.Tensor, AttnMetadata], torch.Tensor]  # (input_ids [T], meta) -> hidden [T, H]


def graph_module(device: torch.device) -> tuple[ModuleType, type]:
    """``(module, Graph class)`` of ``device``'s platform (:meth:`Platform.graph_api`): the module
    whose ``graph``, ``graph_pool_handle``, ``Stream``, ``stream`` and ``current_stream`` capture
    graphs; a clear error when the device has no graph capture."""
    return platform_for_device(device).graph_api()


class DecodeGraphRunner:
    """Runs decode-only steps of at most ``max(buckets)`` sequences on static buffers (see the
    module doc); ``capture=False`` is the eager static path (no graphs)."""

    def __init__(
        self,
        backend: Backend,
        forward: Forward,
        num_heads: int,
        num_kv_heads: int,
        block_size: int,
        max_model_len: int,
        capture: bool,
    ) -> None:
        cfg = backend.profile.data.get("graphs") or {}
        self.buckets = sorted({int(b) for b in cfg.get("decode_buckets") or []})
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"graphs.decode_buckets must list positive batch sizes, got {cfg.get('decode_buckets')}")
        self.backend = backend
        self.forward_fn = forward
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.max_blocks = int(cfg.get("max_blocks_per_seq") or 0) or -(-max_model_len // block_size)
        self.max_seq_len = self.max_blocks * block_size
        self.graphs, self.graph_cls = backend.platform.graph_api() if capture else (None, None)
        self.pool = self.graphs.graph_pool_handle() if capture else None
        dev, top = backend.device, self.buckets[-1]
        self.input_ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.long, device=dev)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(top, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(top, self.max_blocks, dtype=torch.int32, device=dev)
        self._metas: dict[int, AttnMetadata] = {}
        self._graphs: dict[int, tuple[object, torch.Tensor]] = {}  # bucket -> (graph, static output)

    def bucket(self, n: int) -> int:
        """The smallest bucket holding ``n`` sequences."""
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    def can_run(self, meta: AttnMetadata) -> bool:
        """A decode-only step (no tree masks) that fits the largest bucket and the table width."""
        return (
            0 < meta.num_stages <= self.buckets[-1]
            and meta.max_query_len == 1
            and meta.tree_mask_offsets is None
            and meta.block_tables.shape[1] <= self.max_blocks
            and meta.max_seq_len <= self.max_seq_len
        )

    def static_meta(self, b: int) -> AttnMetadata:
        """Bucket ``b``'s token table: views of the static buffers plus the fixed plan (built once;
        the same tensors, shapes and plan for every step of the bucket)."""
        meta = self._metas.get(b)
        if meta is None:
            meta = self._metas[b] = AttnMetadata(
                query_start_loc=self.query_start_loc[: b + 1],
                seq_lens=self.seq_lens[:b],
                block_tables=self.block_tables[:b],
                slot_mapping=self.slot_mapping[:b],
                positions=self.positions[:b],
                query_lens_cpu=[1] * b,
                seq_lens_cpu=[self.max_seq_len] * b,  # what the plan was made for, not the step's
                plan=self.backend.plan_decode(b, self.max_seq_len, self.num_heads, self.num_kv_heads),
            )
        return meta

    def load(self, input_ids: torch.Tensor, meta: AttnMetadata) -> int:
        """Copy the step's inputs (``meta`` as :meth:`can_run` accepts) into the static buffers,
        padding to the bucket; returns the bucket."""
        n = meta.num_stages
        b = self.bucket(n)
        self.input_ids[:n].copy_(input_ids)
        self.input_ids[n:b].zero_()
        self.positions[:n].copy_(meta.positions)
        self.positions[n:b].zero_()
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:b].fill_(1)
        self.block_tables[:b].zero_()
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        return b

    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """Hidden states ``[n, H]`` of the step's ``n`` tokens (a view of the bucket's output)."""
        n = meta.num_stages
        b = self.load(input_ids, meta)
        if self.graphs is None:
            return self.forward_fn(self.input_ids[:b], self.static_meta(b))[:n]
        if b not in self._graphs:
            self._graphs[b] = self._capture(b)
        graph, out = self._graphs[b]
        graph.replay()
        return out[:n]

    def _capture(self, b: int) -> tuple[object, torch.Tensor]:
        """Warm up bucket ``b`` eagerly on a side stream (compiles its kernels; the buffers hold the
        current step, so the KV writes are the ones the replay repeats), then capture it."""
        mod, ids, meta = self.graphs, self.input_ids[:b], self.static_meta(b)
        side = mod.Stream()
        side.wait_stream(mod.current_stream())
        with mod.stream(side):
            self.forward_fn(ids, meta)
        mod.current_stream().wait_stream(side)
        graph = self.graph_cls()
        with mod.graph(graph, pool=self.pool):
            out = self.forward_fn(ids, meta)
        return graph, out


def make_decode_graph_runner(
    backend: Backend,
    forward: Forward,
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    max_model_len: int,
    enforce_eager: bool | None,
) -> DecodeGraphRunner | None:
    """The static decode path ``LLM(enforce_eager=...)`` asks for, or None (dynamic eager steps).

    ``enforce_eager=None`` (default): graphs on ``cuda`` and ``npu`` (an NPU without graph support
    warns and runs eager), off elsewhere. ``True``: off. ``False``: graphs on ``cuda`` / ``npu``
    (an error where capture is unavailable), the eager static path on ``interpret``; the ``cpu``
    backend has no static decode plan and always runs eager."""
    if enforce_eager or not backend.static_decode:
        return None
    capture = backend.platform.graph_capture
    if not capture and enforce_eager is None:
        return None
    args = (backend, forward, num_heads, num_kv_heads, block_size, max_model_len)
    try:
        return DecodeGraphRunner(*args, capture=capture)
    except RuntimeError as e:
        if enforce_eager is not None:
            raise
        warnings.warn(f"decode graphs disabled, running eager: {e}", stacklevel=2)
        return None
