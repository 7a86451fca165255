"""How a Llama-family model splits over ``size`` tensor-parallel ranks (Megatron-style).

QKV and gate-up are column-parallel (each rank holds whole heads and a slice of the intermediate
size), O and down are row-parallel (the matching input columns; one all-reduce each), embedding and
LM head are vocab-parallel (each rank holds ``ceil(V / size)`` rows, the last one zero-padded).
With fewer KV heads than ranks each KV head is replicated on ``size // num_kv_heads`` ranks, as
vLLM does.

Mixture of experts, as vLLM: by default every rank holds every expert, each split on its
intermediate dimension like a dense MLP (gate-up column-parallel, down row-parallel, one
all-reduce); with ``expert_parallel`` experts are dealt to ranks whole (``num_experts / size``
each) and every rank runs its own experts on all of the step's tokens, the same all-reduce
combining them. Routers and the shared expert's gate are replicated; the shared expert is split
like a dense MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


def check_tensor_parallel(config: ModelConfig, size: int, expert_parallel: bool = False) -> None:
    """Raise ``ValueError`` naming both numbers when ``config`` cannot be split over ``size`` ranks."""
    if expert_parallel and not config.is_moe:
        raise ValueError(f"enable_expert_parallel=True needs a mixture-of-experts model, not {config.architecture}")
    dense = config.intermediate_size if not config.is_moe or config.dense_layers else size
    check_split(config.num_heads, config.num_kv_heads, dense, size)
    if size == 1 or not config.is_moe:
        return
    routed = ("num_experts", config.num_experts) if expert_parallel else (
        "moe_intermediate_size", config.moe_intermediate_size)  # fmt: skip
    for name, val in (routed, ("shared_expert_intermediate_size", config.shared_expert_intermediate_size)):
        if val % size:
            what = "expert parallel" if name == "num_experts" else "tensor parallel"
            raise ValueError(f"{what} size {size} does not divide the model's {name}={val}")


def check_split(num_heads: int, num_kv_heads: int, intermediate_size: int, size: int) -> None:
    """:func:`check_tensor_parallel` on the bare dimensions."""
    if size == 1:
        return
    if num_heads % size:
        raise ValueError(f"tensor_parallel_size={size} does not divide the model's num_attention_heads={num_heads}")
    kv = num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        raise ValueError(
            f"tensor_parallel_size={size} and num_key_value_heads={kv}: one must divide the other "
            f"(KV heads are split over ranks, or replicated when there are fewer than ranks)"
        )
    if intermediate_size % size:
        raise ValueError(
            f"tensor_parallel_size={size} does not divide the model's intermediate_size={intermediate_size}"
        )


@dataclass(frozen=True)
class ShardPlan:
    """Rank ``rank``'s part: query heads ``[q_start, q_start + num_heads)``, KV heads
    ``[kv_start, kv_start + num_kv_heads)``, intermediate rows ``[inter_start, inter_start +
    intermediate)``, vocabulary rows ``[vocab_start, vocab_start + vocab_rows)`` of a padded
    ``vocab_per_rank``."""

    rank: int
    size: int
    num_heads: int
    q_start: int
    num_kv_heads: int
    kv_start: int
    intermediate: int
    inter_start: int
    vocab_per_rank: int
    vocab_start: int
    vocab_rows: int
    # mixture of experts: experts [expert_start, expert_start + num_local_experts), each with
    # intermediate rows [moe_inter_start, moe_inter_start + moe_inter); the shared expert's rows
    expert_start: int = 0
    num_local_experts: int = 0
    moe_inter: int = 0
    moe_inter_start: int = 0
    shared_inter: int = 0
    shared_inter_start: int = 0

    @classmethod
    def make(cls, config: ModelConfig, rank: int = 0, size: int = 1, expert_parallel: bool = False) -> ShardPlan:
        check_tensor_parallel(config, size, expert_parallel)
        hq = config.num_heads // size
        kv = config.num_kv_heads
        if kv >= size:
            hkv, kv_start = kv // size, rank * (kv // size)
        else:
            hkv, kv_start = 1, rank // (size // kv)
        inter = config.intermediate_size // size
        vp = -(-config.vocab_size // size)
        v0 = min(rank * vp, config.vocab_size)
        e, mi, si = config.num_experts, config.moe_intermediate_size, config.shared_expert_intermediate_size // size
        if expert_parallel:
            experts = (rank * (e // size), e // size, mi, 0)
        else:
            experts = (0, e, mi // size, rank * (mi // size))
        return cls(rank, size, hq, rank * hq, hkv, kv_start, inter, rank * inter, vp, v0,
                   min(vp, config.vocab_size - v0), *experts, si, rank * si)  # fmt: skip
