"""The ``cpu`` backend: the default execution path on machines without an accelerator.

Every op is torch written for speed (packed oneDNN weights, batched decode attention, in-place
RoPE and cache writes), and in bf16 most run in C (``cpu_native.c``, built at first use with the
system compiler; AMX GEMMs where the CPU has AMX). fp32 always stays on torch ops, the exact path
compared with HF transformers. Like every backend it is tested against the definitions in
``reference.py``; ``docs/cpu_backend.md`` explains the choices.

State: the per-step plan of short stages (:class:`_BatchedPlan`) lives on the step's
``AttnMetadata``; the one piece of state kept from step to step is the decode batch's contiguous
K/V history (:class:`_KVCopy`, fp32 or without C), checked against the batch's sequence ids and
lengths on every use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_native
from .base import AttnMetadata, Backend
from .quant import QuantWeight
from .reference import gather_kv, sample_ref, silu_and_mul_ref, stage_mask, store_kv_ref, tree_mask


def _adjacent(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """``[T, Hq + Hkv, D]`` view over ``q`` and ``k`` when ``k`` directly follows ``q`` in each
    row (both sliced from one QKV projection), else None."""
    t, hq, d = q.shape
    row = q.stride(0)
    if (
        k.dtype != q.dtype
        or q.stride()[1:] != (d, 1)
        or k.stride()[1:] != (d, 1)
        or (t > 1 and k.stride(0) != row)  # a single row's stride is arbitrary
        or k.data_ptr() != q.data_ptr() + hq * d * q.element_size()
    ):
        return None
    return q.as_strided((t, hq + k.shape[1], d), (row, d, 1))


def argmax_rows(x: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """``x.argmax(-1)`` for ``[N, V]`` rows, the same index (first of ties, NaN counts as largest)
    in about a tenth of the time: torch's CPU argmax is not vectorised, amax is. The row maximum is
    found per ``chunk`` columns, then only the first chunk holding it is searched."""
    n, v = x.shape
    if v % chunk or v < 4 * chunk:
        return x.argmax(-1)
    best = x.view(n, v // chunk, chunk).amax(-1).argmax(-1)  # [N]: first chunk holding the maximum
    cols = best[:, None] * chunk + torch.arange(chunk, device=x.device)
    return best * chunk + x.gather(1, cols).argmax(-1)


_HAS_MKLDNN_PACKING = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)


SMALL_STAGE = 16  # stages with at most this many query rows share one padded SDPA call


@dataclass
class _BatchedPlan:
    """The step's short causal stages (decodes, verifies, short chunks) as one padded batch,
    built once per step and reused by every layer. ``n`` stages, ``q_pad`` query rows each,
    ``num_blocks`` KV blocks each."""

    stages: list[int]  # which stages are batched; the others run one SDPA call each
    rows: torch.Tensor  # int64 [R]: the query rows (token indices) of the batched stages
    slots: torch.Tensor  # int64 [R]: where each of them sits in the padded [n * q_pad] batch
    table: torch.Tensor  # int64 [n * num_blocks]: every batched stage's first num_blocks block ids
    mask: torch.Tensor  # bool [n, 1, q_pad, num_blocks * block_size]
    q_pad: int
    num_blocks: int
    # decode batches (q_pad == 1) with known sequence ids: what _KVCopy needs to append a token
    ids: list[int] | None = None
    kv_lens: list[int] | None = None
    new_slots: torch.Tensor | None = None  # int64 [n]: cache slot of each stage's new token
    last: torch.Tensor | None = None  # int64 [n]: its position (kv_len - 1)
    batch_rows: torch.Tensor | None = None  # int64 [n]: arange(n)
    # int64 [4, n]: block-table row, first query row, query length, KV length (the C attention's view)
    native: torch.Tensor | None = None

    @classmethod
    def build(cls, meta: AttnMetadata, block_size: int) -> _BatchedPlan:
        trees = [-1] * meta.num_stages if meta.tree_mask_offsets is None else meta.tree_mask_offsets.tolist()
        stages = [
            s for s, q in enumerate(meta.query_lens_cpu) if 0 < q <= SMALL_STAGE and trees[s] < 0
        ]  # fmt: skip
        dev = meta.seq_lens.device
        q_lens = [meta.query_lens_cpu[s] for s in stages]
        kv_lens = [meta.seq_lens_cpu[s] for s in stages]
        q_pad = max(q_lens, default=1)
        nblk = (max(kv_lens, default=1) + block_size - 1) // block_size
        starts = meta.query_start_loc.tolist()
        rows = [starts[s] + i for s, q in zip(stages, q_lens) for i in range(q)]
        slots = [j * q_pad + i for j, q in enumerate(q_lens) for i in range(q)]
        sel = torch.tensor(stages, dtype=torch.long, device=dev)
        # row i of a stage sees column c when c <= history + i; padded rows see column 0 only
        hist = torch.tensor([kv - q for kv, q in zip(kv_lens, q_lens)], device=dev)
        row = torch.arange(q_pad, device=dev)
        limit = torch.where(row[None, :] < torch.tensor(q_lens, device=dev)[:, None], hist[:, None] + row, 0)
        cols = torch.arange(nblk * block_size, device=dev)
        mask = (cols[None, None, :] <= limit[:, :, None])[:, None]
        table = meta.block_tables[sel, :nblk].reshape(-1).long()
        as_long = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        plan = cls(stages, as_long(rows), as_long(slots), table, mask, q_pad, nblk)
        plan.native = as_long([stages, [starts[s] for s in stages], q_lens, kv_lens])
        if q_pad == 1 and stages and meta.seq_ids is not None:
            plan.ids = [meta.seq_ids[s] for s in stages]
            plan.kv_lens = kv_lens
            plan.new_slots = meta.slot_mapping[plan.rows]
            plan.last = as_long([kv - 1 for kv in kv_lens])
            plan.batch_rows = torch.arange(len(stages), device=dev)
        return plan

    def gather(self, cache: torch.Tensor, length: int) -> torch.Tensor:
        """``[n, length, Hkv, D]``: every batched stage's first ``num_blocks`` blocks of ``cache``."""
        return cache.index_select(0, self.table).view(len(self.stages), length, *cache.shape[2:])


# Steps of at most this many rows run their bf16 GEMMs as the C GEMV over plain weights (it reads
# each weight once per row, so from 2 rows on oneDNN's packed kernels win; benchmarks/cpu_bandwidth.py).
GEMV_ROWS = 1
# Steps of at most this many rows run SiLU-and-mul in C (per-op costs dominate there); larger ones
# stay on torch's vectorised (and threaded) SiLU.
SMALL_ROWS = 8


@dataclass(frozen=True)
class _AmxWeight:
    """A bf16 GEMM weight as AMX tiles (:func:`cpu_native.pack_amx`), for hosts with AMX."""

    tiles: torch.Tensor
    n: int
    k: int


@dataclass(frozen=True)
class _Bf16Weight:
    """A bf16 GEMM weight in both forms: oneDNN-packed, and plain ``[N, K]`` for the C GEMV."""

    packed: torch.Tensor
    plain: torch.Tensor


@dataclass(frozen=True)
class _QuantCpuWeight:
    """A quantized GEMM weight (:class:`QuantWeight`) for the C kernels, with the activation mode."""

    weight: QuantWeight
    int8: bool


# Steps of at least this many rows multiply quantized weights on AMX hosts by dequantizing each weight
# to bf16 tiles first (cpu_native.dequant_amx) and running the AMX GEMM: from about 16 rows that beats
# the VNNI kernel, whose per-block scaling makes it compute-bound (benchmarks/decode_split.py).
AMX_QUANT_ROWS = 16


KV_COPY_BUDGET = 32 << 20  # bytes of K+V copies kept per layer; larger decode batches gather each step
KV_COPY_MIN = 256 << 10  # below this many bytes of K per layer, gathering costs less than appending
KV_COPY_SLACK = 64  # tokens of headroom per sequence, so a copy is re-gathered every ~64 steps


@dataclass
class _KVCopy:
    """One layer's K/V history of a decode batch, contiguous per sequence (``[n, cap, Hkv, D]``;
    past a sequence's end: finite filler, masked), carried from step to step. A step whose decode stages are the
    same sequences in the same order, each exactly one token longer, appends that token instead of
    gathering every block again. Positions below a sequence's length never change in the paged
    cache, so the copy stays exact; anything else (a sequence joins or leaves, a verify step
    rewinds) fails the check and the copy is rebuilt from the cache."""

    ids: list[int]
    lens: list[int]
    k: torch.Tensor
    v: torch.Tensor


class CpuBackend(Backend):
    """torch ops on CPU tensors; decode-only batches take a batched (padded) attention path."""

    name = "cpu"

    def __init__(self, device: torch.device, profile) -> None:
        super().__init__(device, profile)
        self._kv_copies: dict[int, _KVCopy] = {}  # by the layer's k_cache data_ptr
        self._native = cpu_native.load()  # the bf16 ops in C (cpu_native.c); None without a compiler
        self._amx = self._native is not None and cpu_native.has_amx(self._native)
        self._tiles: torch.Tensor | None = None  # bf16 AMX tiles of the quantized weight being multiplied

    def prepare_weight(self, weight):
        # bf16 on a host with AMX: our AMX kernel (cpu_native.c) for every GEMM. Otherwise oneDNN,
        # with the weight packed once into its blocked layout (saves a reorder per call, ~25% of
        # decode time here; bit-identical to F.linear), and with the C path the plain weight too,
        # for the GEMV of single-row steps. fp32 stays on F.linear: oneDNN's packed fp32 path is
        # not row-invariant across M.
        if weight.dtype == torch.bfloat16 and self._amx:
            return _AmxWeight(cpu_native.pack_amx(weight), *weight.shape)
        if weight.dtype == torch.bfloat16 and _HAS_MKLDNN_PACKING:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            return packed if self._native is None else _Bf16Weight(packed, weight.contiguous())
        return weight

    def quantized_dtypes(self) -> tuple[torch.dtype, ...]:
        return () if self._native is None else (torch.bfloat16,)

    def prepare_quant_weight(self, weight: QuantWeight, int8_activations: bool) -> _QuantCpuWeight:
        if self._native is None:
            raise NotImplementedError("cpu backend: quantized weights need the C kernels (cpu_native)")
        return _QuantCpuWeight(cpu_native.pack_quant(self._native, weight, int8_activations), int8_activations)

    def _linear_quant(self, x: torch.Tensor, weight: _QuantCpuWeight, bias: torch.Tensor | None) -> torch.Tensor:
        w = weight.weight
        if x.dtype != torch.bfloat16:
            raise TypeError(f"cpu backend: a quantized weight needs bf16 activations, got {x.dtype}")
        if x.shape[-1] != w.k:
            raise ValueError(f"cpu backend: activations {tuple(x.shape)} do not fit a [{w.n}, {w.k}] weight")
        if bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != (w.n,)):
            raise ValueError(f"cpu backend: bias {bias.dtype} {tuple(bias.shape)} for a [{w.n}, {w.k}] weight")
        rows = x.reshape(-1, w.k).contiguous()
        if rows.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], w.n)
        bias = None if bias is None else bias.contiguous()
        if self._amx and rows.shape[0] >= AMX_QUANT_ROWS:  # dequantized to bf16 tiles, then the AMX GEMM
            size = -(-w.n // 16) * 16 * w.k
            if self._tiles is None or self._tiles.numel() < size:
                self._tiles = torch.empty(size, dtype=torch.bfloat16)
            tiles = cpu_native.dequant_amx(self._native, w, self._tiles, int8_packed=weight.int8)
            return cpu_native.gemm_amx(self._native, rows, tiles, w.n, bias).view(*x.shape[:-1], w.n)
        out = cpu_native.qgemm(self._native, rows, w, bias, weight.int8)
        return out.view(*x.shape[:-1], w.n)

    def _linear_amx(self, x: torch.Tensor, weight: _AmxWeight, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            raise TypeError(f"cpu backend: a bf16 weight needs bf16 activations, got {x.dtype}")
        if x.shape[-1] != weight.k:
            raise ValueError(f"cpu backend: activations {tuple(x.shape)} do not fit a [{weight.n}, {weight.k}] weight")
        rows = x.reshape(-1, weight.k).contiguous()
        if rows.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], weight.n)
        if bias is not None:
            if bias.dtype != torch.bfloat16 or bias.shape != (weight.n,):
                got = f"{bias.dtype} {tuple(bias.shape)}"
                raise ValueError(f"cpu backend: bias {got} for a [{weight.n}, {weight.k}] bf16 weight")
            bias = bias.contiguous()
        return cpu_native.gemm_amx(self._native, rows, weight.tiles, weight.n, bias).view(*x.shape[:-1], weight.n)

    def linear(self, x, weight, bias=None):
        if isinstance(weight, _QuantCpuWeight):
            return self._linear_quant(x, weight, bias)
        if isinstance(weight, _AmxWeight):
            return self._linear_amx(x, weight, bias)
        if isinstance(weight, _Bf16Weight):
            if x.shape[0] <= GEMV_ROWS and x.dtype == torch.bfloat16 and x.dim() == 2 and x.is_contiguous():
                return cpu_native.gemv(self._native, x, weight.plain, bias)
            weight = weight.packed
        if weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def rms_norm(self, x, weight, eps, residual=None):
        if (
            self._native is not None
            and x.dtype == weight.dtype == torch.bfloat16
            and x.dim() == 2
            and x.is_contiguous()
            and weight.shape == x.shape[1:]
            and weight.is_contiguous()
            and (residual is None or (residual.dtype == torch.float32 and residual.is_contiguous()))
            and (residual is None or residual.shape == x.shape)
        ):
            return cpu_native.rms_norm(self._native, x, weight, eps, residual)
        src = x if residual is None else x + residual
        if src.dtype == weight.dtype:
            out = F.rms_norm(src, (x.shape[-1],), weight, eps)
        else:  # fp32 residual stream, bf16/fp16 activations
            out = F.rms_norm(src.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight
        return out, (None if residual is None else src)

    def rope(self, q, k, positions, cos_sin):
        qk = _adjacent(q, k)  # q and k sliced from one QKV GEMM output: rotate them in place
        if (
            qk is not None
            and self._native is not None
            and qk.dtype == torch.bfloat16
            and cos_sin.dtype == torch.float32
            and cos_sin.is_contiguous()
            and positions.dtype == torch.int64
            and positions.is_contiguous()
        ):
            cpu_native.rope_(self._native, qk, positions, cos_sin)
            return q, k
        # one multiply-add rotates both halves: x * [cos, cos] + [x2, x1] * [-sin, sin]
        half = cos_sin.shape[-1] // 2
        cs = cos_sin[positions]
        cos, sin = cs[:, None, :half], cs[:, None, half:]
        cos, sin = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
        t, hq, d = q.shape
        x = (torch.cat((q, k), dim=1) if qk is None else qk).float()
        out = x * cos
        out += x.view(t, -1, 2, d // 2).flip(2).view(x.shape) * sin
        if qk is None:
            out = out.to(q.dtype)
            return out[:, :hq], out[:, hq:]
        qk.copy_(out)
        return q, k

    def silu_and_mul(self, x):
        # torch's vectorised, threaded SiLU beats the C loop on a batch; on a few rows torch's
        # three ops cost more than the work (SMALL_ROWS)
        if (
            self._native is not None
            and x.shape[0] <= SMALL_ROWS
            and x.dtype == torch.bfloat16
            and x.dim() == 2
            and x.is_contiguous()
        ):
            return cpu_native.silu_and_mul(self._native, x)
        return silu_and_mul_ref(x)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        if (
            self._native is not None
            and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16
            and k.stride()[1:] == v.stride()[1:] == (k.shape[2], 1)
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
            and slot_mapping.dtype == torch.int64
            and slot_mapping.is_contiguous()
        ):  # a memcpy per row, where torch's index_copy_ pair costs several times more
            return cpu_native.store_kv(self._native, k, v, k_cache, v_cache, slot_mapping)
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)

    def attention(self, q, k_cache, v_cache, meta, scale):
        plan = meta.plan
        if not isinstance(plan, _BatchedPlan):  # built once per step, reused by every layer
            plan = meta.plan = _BatchedPlan.build(meta, k_cache.shape[1])
        native = self._native_attention_ok(q, k_cache, v_cache, meta)
        if not native and len(plan.stages) == meta.num_stages and plan.q_pad == 1:
            return self._batched_attention(q, k_cache, v_cache, plan, scale)  # decode-only step
        out = torch.empty_like(q)
        if plan.stages and native:  # straight from the paged cache into the stages' rows of out
            cpu_native.paged_attention(self._native, q, out, k_cache, v_cache, meta.block_tables, plan.native, scale)
        elif plan.stages:
            out[plan.rows] = self._batched_attention(q[plan.rows], k_cache, v_cache, plan, scale)
        hq, hkv = q.shape[1], k_cache.shape[2]
        starts = meta.query_start_loc.tolist()
        batched = set(plan.stages)
        for s, (q_len, kv_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            if q_len == 0 or s in batched:
                continue
            a = starts[s]
            # 4-d [1, H, rows, D] operands: torch's fused CPU attention (3-d ones take the ~6x
            # slower math fallback)
            qs = q[a : a + q_len].transpose(0, 1)[None]
            k = gather_kv(k_cache, meta.block_tables[s], kv_len).transpose(0, 1)[None]
            v = gather_kv(v_cache, meta.block_tables[s], kv_len).transpose(0, 1)[None]
            tree = tree_mask(meta, s, q_len)
            if tree is None and kv_len == q_len:
                o = F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale, enable_gqa=hq != hkv)
            else:
                mask = stage_mask(q_len, kv_len, tree, q.device)
                o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
            out[a : a + q_len] = o[0].transpose(0, 1)
        return out

    def _native_attention_ok(self, q, k_cache, v_cache, meta: AttnMetadata) -> bool:
        return (
            self._native is not None
            and q.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16
            and q.stride()[1:] == (q.shape[2], 1)
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
            and meta.block_tables.dtype == torch.int32
            and meta.block_tables.is_contiguous()
        )

    def _batched_attention(self, q, k_cache, v_cache, plan: _BatchedPlan, scale):
        """Short stages as one padded SDPA call: each stage's blocks gathered into ``[n, L]`` K/V
        (read in place of a concatenation, no transposes materialised), queries padded to
        ``q_pad`` rows, GQA groups folded into the query rows, visibility from the plan's mask."""
        r, hq, d = q.shape
        bs, hkv = k_cache.shape[1], k_cache.shape[2]
        n, qp, g = len(plan.stages), plan.q_pad, hq // hkv
        length = plan.num_blocks * bs
        if qp == 1:  # decode: no padding, the GQA group is the query-row axis
            k, v = self._decode_history(k_cache, v_cache, plan, length)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            o = F.scaled_dot_product_attention(q.view(n, hkv, g, d), k, v, attn_mask=plan.mask, scale=scale)
            return o.reshape(n, hq, d)
        k, v = plan.gather(k_cache, length).transpose(1, 2), plan.gather(v_cache, length).transpose(1, 2)
        qpad = q.new_zeros(n * qp, hq, d)
        qpad[plan.slots] = q
        qpad = qpad.view(n, qp, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(n, hkv, g * qp, d)
        mask = plan.mask.expand(n, g, qp, length).reshape(n, 1, g * qp, length)
        o = F.scaled_dot_product_attention(qpad, k, v, attn_mask=mask, scale=scale)
        o = o.view(n, hkv, g, qp, d).permute(0, 3, 1, 2, 4).reshape(n * qp, hq, d)
        return o[plan.slots]

    def _decode_history(self, k_cache, v_cache, plan: _BatchedPlan, length: int):
        """``[n, length, Hkv, D]`` K and V of a decode batch: this layer's :class:`_KVCopy` plus
        the step's new token where the copy is still valid, otherwise gathered from the blocks."""
        n, hkv, d = len(plan.stages), k_cache.shape[2], k_cache.shape[3]
        key = k_cache.data_ptr()
        copy = self._kv_copies.get(key)
        if (
            copy is not None
            and copy.ids == plan.ids
            and length <= copy.k.shape[1]
            and all(a + 1 == b for a, b in zip(copy.lens, plan.kv_lens))
        ):
            idx = (plan.batch_rows, plan.last)
            copy.k.index_put_(idx, k_cache.view(-1, hkv, d).index_select(0, plan.new_slots))
            copy.v.index_put_(idx, v_cache.view(-1, hkv, d).index_select(0, plan.new_slots))
            copy.lens = plan.kv_lens
            return copy.k[:, :length], copy.v[:, :length]
        k, v = plan.gather(k_cache, length), plan.gather(v_cache, length)
        bs = k_cache.shape[1]
        cap = -(-(length + KV_COPY_SLACK) // bs) * bs
        size = n * hkv * d * k.element_size()
        if plan.ids is None or size * length < KV_COPY_MIN or 2 * size * cap > KV_COPY_BUDGET:
            self._kv_copies.pop(key, None)
            return k, v
        ck, cv = k.new_zeros(n, cap, hkv, d), v.new_zeros(n, cap, hkv, d)
        ck[:, :length], cv[:, :length] = k, v
        self._kv_copies[key] = _KVCopy(plan.ids, plan.kv_lens, ck, cv)
        return k, v

    def sample(self, logits, temperature, top_k, top_p, min_p, uniform):
        if bool((temperature <= 0).all()):
            return argmax_rows(logits)
        return sample_ref(logits, temperature, top_k, top_p, min_p, uniform)
