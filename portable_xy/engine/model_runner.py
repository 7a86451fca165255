"""Runs one scheduled step: builds the token table (AttnMetadata), runs the model, samples."""

from __future__ import annotations

import torch

from ..backends import AttnMetadata, Backend
from ..backends.graphs import DecodeGraphRunner
from ..models.llama import LlamaForCausalLM
from .sampler import SampleResult, sample
from .scheduler import ScheduledBatch
from .sequence import Sequence


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()


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

    def build_metadata(self, batch: ScheduledBatch) -> tuple[torch.Tensor, AttnMetadata, list[int]]:
        """Token ids, the step's token table, and the row of each sequence whose logits are
        needed (-1 for a prefill chunk that does not reach the end of its tokens)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            c = seq.num_computed_tokens
            ids.extend(seq.token_ids[c : c + n])
            table = seq.block_table
            for pos in range(c, c + n):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            starts.append(starts[-1] + n)
            seq_lens.append(c + n)
            sample_rows.append(starts[-1] - 1 if c + n == seq.num_tokens else -1)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs]
        dev = self.backend.device
        meta = AttnMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            query_lens_cpu=list(batch.num_tokens),
            seq_lens_cpu=seq_lens,
        )
        return torch.tensor(ids, dtype=torch.long, device=dev), meta, sample_rows

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, eos_ids: list[int]) -> dict[int, SampleResult]:
        """Execute the step; returns the sampled token per sequence id that reached its end."""
        input_ids, meta, rows = self.build_metadata(batch)
        c = self.model.config
        if self.graphs is not None and self.graphs.can_run(meta):  # decode-only: padded to a graph bucket
            hidden = self.graphs.forward(input_ids, meta)
        else:
            self.backend.prepare(meta, c.num_heads, c.num_kv_heads)
            hidden = self.model.forward(input_ids, meta, self.kv_caches)
        picked: list[Sequence] = [s for s, r in zip(batch.seqs, rows) if r >= 0]
        if not picked:
            return {}
        idx = torch.tensor([r for r in rows if r >= 0], dtype=torch.long, device=hidden.device)
        logits = self.model.logits(hidden[idx])
        results = sample(self.backend, logits, picked, eos_ids)
        return {s.seq_id: r for s, r in zip(picked, results)}
