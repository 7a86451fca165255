"""The backend op interface shared by the `cpu`, `interpret`, `cuda` and `npu` backends.

A backend carries a torch device, a :class:`~portable_xy.backends.profile.Profile` (tile menus,
KV block size, core count) and the ops a Llama-family forward pass needs. The `cpu` backend
implements them with torch and is the oracle the Triton kernels are tested against.

KV cache layout (every backend): one tensor per layer and per K/V of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; a token's *slot* is
``block_id * block_size + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .platforms import PLATFORMS, Platform, platform_for_device
from .profile import Profile
from .quant import QuantWeight


@dataclass
class AttnMetadata:
    """The step's token table, as tensors on the backend device.

    Tokens of all stages (prefill chunks, decodes, verifies) are concatenated along dim 0.
    Stage ``s`` owns query rows ``query_start_loc[s]:query_start_loc[s+1]``; its KV length
    after this step is ``seq_lens[s]`` and its history (already cached before this step) is
    ``seq_lens[s] - query_len[s]``. Query row ``i`` of stage ``s`` sees every history column and
    the new columns ``j <= i`` (causal) -- or, when ``tree_mask_offsets[s] >= 0``, the new
    columns ``j`` with ``tree_masks[tree_mask_offsets[s] + i * query_len + j] != 0``.
    """

    query_start_loc: torch.Tensor  # int32 [S + 1]
    seq_lens: torch.Tensor  # int32 [S]
    block_tables: torch.Tensor  # int32 [S, max_blocks_per_seq]
    slot_mapping: torch.Tensor  # int64 [T]; -1 = do not store
    positions: torch.Tensor  # int64 [T] (RoPE positions)
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    tree_mask_offsets: torch.Tensor | None = None  # int32 [S]; -1 = causal
    tree_masks: torch.Tensor | None = None  # int8 flat, row-major q_len x q_len per tree stage
    # Per stage, the id of its sequence (unique within an engine): lets a backend carry
    # per-sequence state from step to step (the cpu backend's decode K/V copies). Optional.
    seq_ids: list[int] | None = None
    # Backend-private plans built once per step (e.g. a Meta-Attention task table).
    plan: object | None = None

    @property
    def num_stages(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)


class Backend:
    """Base class: a device, a profile and the ops. Subclasses override every op."""

    name: str = "base"
    # whether :meth:`plan_decode` exists: static-shape decode steps (graphs, ``backends/graphs.py``)
    static_decode: bool = False

    def __init__(self, device: torch.device, profile: Profile) -> None:
        self.device = device
        self.profile = profile

    @property
    def platform(self) -> Platform:
        """The vendor facts of this backend (``backends/platforms/``): its own platform, else its
        device's."""
        return PLATFORMS[self.name] if self.name in PLATFORMS else platform_for_device(self.device)

    # ---- planning (host side, once per step) -------------------------------------------------
    def prepare(self, meta: AttnMetadata, num_heads: int, num_kv_heads: int, head_dim: int | None = None) -> None:
        """Attach backend-private per-step plans to ``meta`` (no-op by default)."""

    def plan_decode(self, batch_size: int, max_seq_len: int, num_heads: int, num_kv_heads: int) -> object:
        """A fixed per-bucket plan for :attr:`AttnMetadata.plan`: valid for every decode-only step of
        ``batch_size`` stages with KV lengths up to ``max_seq_len`` (read from ``meta.seq_lens``
        at run time), so that a captured graph can replay it. Only where :attr:`static_decode`."""
        raise NotImplementedError(f"backend {self.name!r} has no static decode plan")

    def prepare_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Convert a ``[N, K]`` GEMM weight once, at load time, into the form :meth:`linear` takes
        (e.g. a pre-packed layout). Default: unchanged."""
        return weight

    def quantized_dtypes(self) -> tuple[torch.dtype, ...]:
        """Activation dtypes for which :meth:`linear` takes weights kept quantized
        (:meth:`prepare_quant_weight`); none by default, so quantized checkpoints are dequantized."""
        return ()

    def prepare_quant_weight(self, weight: QuantWeight, int8_activations: bool) -> object:
        """A :class:`~.quant.QuantWeight` in the form :meth:`linear` takes; ``int8_activations``:
        the GEMM may quantize its activations to int8 (per 32 values), else it keeps them."""
        raise NotImplementedError(f"backend {self.name!r} does not run quantized weights")

    # ---- ops ---------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``y[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N])``; ``weight`` as returned by
        :meth:`prepare_weight`."""
        raise NotImplementedError

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """RMSNorm over the last dim, computed in fp32. With ``residual``: ``r = x + residual``
        first (in ``promote(x.dtype, residual.dtype)``, so an fp32 residual stream stays fp32) and
        returns ``(norm(r) * weight, r)``; without: ``(norm(x) * weight, None)``. The normalised
        value is cast to ``x.dtype`` before the weight multiply. Inputs are not modified."""
        raise NotImplementedError

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotary embedding. ``q [T, Hq, D]``, ``k [T, Hkv, D]``, ``positions [T]``,
        ``cos_sin [max_pos, D]`` = ``cat(cos[:, :D/2], sin[:, :D/2])`` in fp32. Returns the rotated q,
        k; a backend may rotate in place and return its inputs."""
        raise NotImplementedError

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, 2I] -> silu(x[:, :I]) * x[:, I:]``."""
        raise NotImplementedError

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write ``k, v [T, Hkv, D]`` into the paged caches at ``slot_mapping [T]`` (-1 = skip)."""
        raise NotImplementedError

    def attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attention of ``q [T, Hq, D]`` over the paged cache (which already holds this step's
        K/V) for a batch mixing prefill, decode and verify stages. Returns ``[T, Hq, D]``."""
        raise NotImplementedError

    def sample(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        min_p: torch.Tensor,
        uniform: torch.Tensor,
    ) -> torch.Tensor:
        """Draw one token per row of ``logits [N, V]`` (fp32).

        ``temperature [N]`` (0 = greedy), ``top_k [N]`` (<=0 = off), ``top_p [N]`` (1 = off),
        ``min_p [N]`` (0 = off), ``uniform [N]`` in [0, 1): the row's random number. Sampling is
        by inverse CDF over the kept tokens in descending-probability order (ties: lower id first),
        so a backend given the same uniforms returns the same tokens. Returns int64 ``[N]``.
        """
        raise NotImplementedError

    # ---- mixture of experts ------------------------------------------------------------------
    def prepare_experts(self, weights: list[object]) -> object:
        """``E`` per-expert GEMM weights (each ``[N, K]`` as returned by :meth:`prepare_weight` or
        :meth:`prepare_quant_weight`) in the form :meth:`fused_moe` takes. Default: the list."""
        return list(weights)

    def moe_route(
        self, router_logits: torch.Tensor, top_k: int, renormalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` softmax routing of ``router_logits [T, E]``: fp32 weights ``[T, k]`` (the
        softmax over all ``E`` experts, renormalised over the chosen ``k`` when ``renormalize``)
        and int64 expert ids ``[T, k]`` (``torch.topk`` order and ties)."""
        from .reference import moe_route_ref

        return moe_route_ref(router_logits, top_k, renormalize)

    def fused_moe(
        self,
        x: torch.Tensor,
        w13: object,
        w2: object,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        expert_start: int = 0,
    ) -> torch.Tensor:
        """The routed experts of ``x [T, H]``: ``sum_j w[t, j] * down_e(silu(gate_e(x)) * up_e(x))``
        over ``e = topk_ids[t, j]``, accumulated in fp32, returned in ``x.dtype``. ``w13`` holds
        merged gate-up ``[2I, H]`` and ``w2`` down ``[H, I]`` weights of experts ``expert_start,
        expert_start + 1, ...`` (from :meth:`prepare_experts`); assignments to other experts add
        nothing (expert parallelism: each rank sums its own experts).

        Default: tokens grouped by expert, then per expert with rows, :meth:`linear`,
        :meth:`silu_and_mul` and :meth:`linear` on its gathered rows only (no padding; a decode
        step reads only its chosen experts' weights)."""
        num_local = len(w13)  # type: ignore[arg-type]
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e, rows, weights in group_by_expert(topk_ids, topk_weights, expert_start, num_local):
            h = self.linear(self.silu_and_mul(self.linear(x.index_select(0, rows), w13[e])), w2[e])  # type: ignore[index]
            # rows are distinct within an expert; index_put_ is ~100x faster than index_add_ on CPU
            out.index_put_((rows,), h.float() * weights[:, None], accumulate=True)
        return out.to(x.dtype)

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on CPU)."""

    def mem_get_info(self) -> tuple[int, int] | None:
        """``(free, total)`` bytes of the device's memory, or None where the KV cache is not sized
        from device memory (CPU)."""
        return None


def group_by_expert(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert_start: int, num_experts: int
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """The ``[T, k]`` assignments grouped by expert: ``(local expert, token rows, fp32 weights)``
    for each of experts ``expert_start ... expert_start + num_experts - 1`` that has any, in
    expert order, tokens ascending within an expert (one stable sort, one host read of counts)."""
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1).long() - expert_start
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat.clamp(-1, num_experts) + 1, minlength=num_experts + 2)[1:-1].tolist()
    start = int((flat < 0).sum())
    weights = topk_weights.reshape(-1).float()
    groups = []
    for e, c in enumerate(counts):
        if c:
            sel = order[start : start + c]
            groups.append((e, sel // k, weights[sel]))
        start += c
    return groups
