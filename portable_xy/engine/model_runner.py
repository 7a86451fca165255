"""Runs one forward pass over a step's stages: builds the token table (AttnMetadata) from
``(sequence, start, tokens)`` inputs, runs the model on the paged KV cache, returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import AttnMetadata, Backend
from ..backends.graphs import DecodeGraphRunner
from ..models.llama import LlamaForCausalLM
from .sequence import Sequence


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class StageInput:
    """``token_ids`` fed at positions ``start, start+1, ...`` of ``seq`` (whose block table already
    covers them); logits are returned for the last ``num_logits`` of them."""

    seq: Sequence
    start: int
    token_ids: list[int]
    num_logits: int


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, backend: Backend, num_blocks: int, block_size: int, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        c = model.config
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=backend.device),
                torch.zeros(shape, dtype=dtype, device=backend.device),
            )
            for _ in range(c.num_layers)
        ]
        self.graphs: DecodeGraphRunner | None = None  # static-shape decode steps (set by LLM: enforce_eager)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks ``src -> dst`` in every layer (copy-on-write prefix reuse), in order."""
        for src, dst in pairs:
            for k_cache, v_cache in self.kv_caches:
                k_cache[dst].copy_(k_cache[src])
                v_cache[dst].copy_(v_cache[src])

    def build_metadata(self, inputs: list[StageInput]) -> tuple[torch.Tensor, AttnMetadata, torch.Tensor]:
        """Token ids, the token table, and the rows whose logits are wanted."""
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
        dev = self.backend.device
        meta = AttnMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            query_lens_cpu=[len(inp.token_ids) for inp in inputs],
            seq_lens_cpu=seq_lens,
            seq_ids=[inp.seq.seq_id for inp in inputs],
        )
        row_idx = torch.tensor(rows, dtype=torch.long, device=dev)
        return torch.tensor(ids, dtype=torch.long, device=dev), meta, row_idx

    @torch.inference_mode()
    def forward(self, inputs: list[StageInput]) -> torch.Tensor:
        """Run the stages; returns fp32 logits ``[sum(num_logits), V]`` in input order."""
        input_ids, meta, rows = self.build_metadata(inputs)
        c = self.model.config
        if self.graphs is not None and self.graphs.can_run(meta):  # decode-only: padded to a graph bucket
            hidden = self.graphs.forward(input_ids, meta)
        else:
            self.backend.prepare(meta, c.num_heads, c.num_kv_heads)
            hidden = self.model.forward(input_ids, meta, self.kv_caches)
        if rows.numel() == 0:
            return hidden.new_empty((0, c.vocab_size), dtype=torch.float32)
        return self.model.logits(hidden[rows])
