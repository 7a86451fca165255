"""Layers every model family shares: reading one rank's GEMM weights (column / row slices, fused
QKV / merged gate-up, quantized blocks kept where the backend runs them) and the vocab-parallel
embedding and LM head.

Tensor parallelism is Megatron-style (``models/sharding.py``): a column-parallel weight is a
row range ``[start, start + size)`` of the ``[N, K]`` checkpoint tensor (``dim=0``), a row-parallel
one a column range (``dim=1``); with one rank both are the whole tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..backends import Backend
from ..backends.quant import QBLOCK, QuantWeight, dequantize_ref
from .sharding import ShardPlan
from .weights import WeightSource

if TYPE_CHECKING:
    from ..distributed.group import TPGroup

GemmPart = torch.Tensor | QuantWeight


class WeightLoader:
    """One rank's weights from ``weights`` on ``backend``'s device in ``dtype``.

    GEMM weights (:meth:`part`, joined by :meth:`gemm`) stored as Q4_0 / Q4_1 / Q8_0 stay quantized
    where the backend runs ``dtype`` on quantized weights and ``quantization`` asks for it; others
    are dequantized, and :attr:`dequantized` records them (storage type -> names) for a notice."""

    def __init__(
        self, weights: WeightSource, backend: Backend, dtype: torch.dtype, shard: ShardPlan, quantization: str | None
    ) -> None:
        self.weights, self.backend, self.dtype, self.shard = weights, backend, dtype, shard
        self.quantization = quantization
        self.names = weights.names()
        self.keep_quantized = quantization is not None and dtype in backend.quantized_dtypes()
        self.dequantized: dict[str, list[str]] = {}

    def tensor(self, name: str, dim: int | None = None, start: int = 0, size: int = 0, required: bool = True):
        """A plain tensor (norms, biases), or its ``[start, start + size)`` range along ``dim``
        under tensor parallelism; ``None`` for a missing optional one."""
        if name not in self.names:
            if required:
                raise ValueError(f"weight {name!r} is missing from the checkpoint")
            return None
        if self.shard.size == 1:
            dim = None
        w = self.weights
        t = w.get(name, dim, start, start + size) if dim is not None else w.get(name)
        out = t.to(device=self.backend.device, dtype=self.dtype).contiguous()
        # safetensors returns tensors on the file's memory map: clean file pages the kernel may drop
        # under memory pressure and read back from disk at the next step. The model owns a copy.
        return out.clone() if out.data_ptr() == t.data_ptr() else out

    def part(self, name: str, dim: int | None = None, start: int = 0, size: int = 0, required: bool = True):
        """A GEMM weight (or one block of rows of a fused one), quantized where it may stay so
        (see the class doc); a column range that splits quantization blocks is dequantized."""
        w = self.weights
        if self.keep_quantized and name in self.names and w.quant_type(name) is not None:
            d = None if self.shard.size == 1 else dim
            if d != 1 or (start % QBLOCK == 0 and size % QBLOCK == 0):
                q = w.get_quant(name, d, start, start + size) if d is not None else w.get_quant(name)
                return q.to(self.backend.device)
        if self.keep_quantized and name in self.names:
            self.dequantized.setdefault(w.storage_type(name), []).append(name)
        return self.tensor(name, dim, start, size, required=required)

    def column(self, name: str, rows: tuple[int, int]) -> GemmPart:
        """Column-parallel GEMM weight: output rows ``[rows[0], rows[0] + rows[1])``."""
        return self.part(name, 0, *rows)

    def row(self, name: str, cols: tuple[int, int]) -> GemmPart:
        """Row-parallel GEMM weight: input columns ``[cols[0], cols[0] + cols[1])``."""
        return self.gemm(self.part(name, 1, *cols))

    def gemm(self, *parts: GemmPart) -> object:
        """One GEMM weight from row blocks (fused QKV, merged gate-up), prepared for the backend:
        quantized when every block is of one block type, else dequantized and concatenated."""
        be, dtype = self.backend, self.dtype
        if all(isinstance(p, QuantWeight) for p in parts) and len({(p.qtype, p.k) for p in parts}) == 1:
            return be.prepare_quant_weight(QuantWeight.cat(list(parts)), self.quantization == "gguf")
        mixed = [p for p in parts if isinstance(p, QuantWeight)]
        if mixed:  # block types that differ within one fused GEMM
            kinds = "+".join(sorted({p.qtype for p in mixed}))
            self.dequantized.setdefault(kinds, []).append(f"{len(parts)} fused")
        plain = [dequantize_ref(p, dtype) if isinstance(p, QuantWeight) else p for p in parts]
        return be.prepare_weight(torch.cat(plain).contiguous() if len(plain) > 1 else plain[0])


class VocabParallelEmbedding:
    """The token embedding and the LM head, each rank holding rows ``[vocab_start, vocab_start +
    vocab_rows)`` zero-padded to ``vocab_per_rank``: lookups sum the ranks' rows (zeros for other
    ranks' ids), logits are gathered on rank 0. A quantized table dequantizes only looked-up rows;
    a tied head reuses the embedding."""

    def __init__(self, loader: WeightLoader, name: str, vocab_size: int, group: TPGroup | None = None) -> None:
        self.shard, self.group, self.dtype, self.vocab_size = loader.shard, group, loader.dtype, vocab_size
        self.backend = loader.backend
        sh = self.shard
        self.embed = self._pad(loader.part(name, 0, sh.vocab_start, sh.vocab_rows))
        self.lm_head: object = None

    def load_head(self, loader: WeightLoader, name: str, tied: bool) -> None:
        """The LM head ``name`` (the embedding itself where the checkpoint ties them)."""
        sh = self.shard
        head = loader.part(name, 0, sh.vocab_start, sh.vocab_rows, required=not tied)
        self.lm_head = loader.gemm(self.embed if head is None else self._pad(head))

    def _pad(self, w: GemmPart) -> GemmPart:
        pad = self.shard.vocab_per_rank - w.shape[0]
        if self.shard.size == 1 or pad == 0:
            return w
        if isinstance(w, QuantWeight):
            z = w.rows(0, 1)
            zero = QuantWeight(w.qtype, z.qs.new_zeros(pad, z.qs.shape[1]), z.d.new_zeros(pad, z.d.shape[1]),
                               z.m.new_zeros(pad, z.m.shape[1]), pad, w.k)  # fmt: skip
            return QuantWeight.cat([w, zero])
        return torch.cat([w, w.new_zeros(pad, w.shape[1])])

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embed
        if isinstance(e, QuantWeight):
            picked = QuantWeight(e.qtype, e.qs[ids], e.d[ids], e.m[ids], ids.shape[0], e.k)
            return dequantize_ref(picked, self.dtype)
        return e[ids]

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[T, H]`` of ``input_ids``."""
        if self.group is None:
            return self._rows(input_ids)
        sh = self.shard  # vocab-parallel: each rank looks up its own ids, zeros elsewhere, summed
        local = input_ids - sh.vocab_start
        mine = (local >= 0) & (local < sh.vocab_rows)
        rows = self._rows(torch.where(mine, local, 0))
        return self.group.all_reduce(rows * mine[:, None].to(rows.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """fp32 logits ``[N, V]`` (under tensor parallelism: gathered on rank 0, ``None`` on the
        other ranks)."""
        out = self.backend.linear(hidden, self.lm_head).float()
        if self.group is None:
            return out
        full = self.group.gather_rows(out)
        return None if full is None else full[:, : self.vocab_size]
