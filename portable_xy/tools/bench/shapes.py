"""Benchmark shapes: the per-rank GEMM shapes of real models at tensor parallelism 8, the M sweep,
the Meta-Attention step mixes (full size for devices, ``tiny`` for CPU runs in CI), and the MoE
layers of two MoE models (one rank, all experts).

GEMM weights are ``[N, K]`` (``nn.Linear`` layout). Megatron-style TP splits QKV and GateUp by
columns (N) and O and Down by rows (K). Heads that do not divide by the TP degree are rounded up
per rank (Qwen2-7B's 28 query heads -> 4 per rank); KV heads fewer than the TP degree are
replicated (one per rank), as vLLM does.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

TP = 8


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


# from the models' config.json (hidden_size, num_attention_heads, num_key_value_heads, head_dim
# = hidden / heads, intermediate_size)
MODELS: dict[str, ModelDims] = {
    "llama2-7b": ModelDims(hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008),
    "qwen2-7b": ModelDims(hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944),
    "llama2-70b": ModelDims(hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672),
    "qwen2.5-72b": ModelDims(hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=29568),
}
OPS = ("qkv", "o", "gate_up", "down")

# token counts per GEMM: powers of two plus the odd sizes a token-budget scheduler produces
M_SWEEP = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 200, 256, 384, 512, 768, 1000, 1024, 1536, 2048, 3000, 4096)
M_SWEEP_TINY = (1, 7, 33, 64)
TINY_SCALE = 32  # tiny mode divides every model dimension by this


@dataclass(frozen=True)
class GemmShape:
    model: str
    op: str
    N: int
    K: int

    @property
    def name(self) -> str:
        return f"{self.model}/{self.op}"


def rank_heads(dims: ModelDims, tp: int = TP) -> tuple[int, int]:
    """(query heads, KV heads) on one rank."""
    return math.ceil(dims.heads / tp), max(1, dims.kv_heads // tp)


def layer_shapes(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> list[tuple[int, int]]:
    """``(N, K)`` of one Llama-family layer's fused GEMMs: QKV, O, gate-up, down."""
    qkv = (heads + 2 * kv_heads) * head_dim
    return [(qkv, hidden), (hidden, heads * head_dim), (2 * intermediate, hidden), (hidden, intermediate)]


def gemm_shapes(model: str, tp: int = TP, scale: int = 1) -> list[GemmShape]:
    """The QKV / O / GateUp / Down ``(N, K)`` of one rank; ``scale`` > 1 shrinks every dimension
    (at least 16) for tiny runs."""
    d = MODELS[model]
    hq, hkv = rank_heads(d, tp)
    nk = layer_shapes(d.hidden, hq, hkv, d.head_dim, math.ceil(d.intermediate / tp))
    return [GemmShape(model, op, max(16, n // scale), max(16, k // scale)) for op, (n, k) in zip(OPS, nk)]


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer: ``experts`` SwiGLU experts (``w13 [E, 2I, H]``, ``w2 [E, H, I]``), top-k routing."""

    model: str
    experts: int
    top_k: int
    hidden: int
    intermediate: int

    @property
    def name(self) -> str:
        return f"{self.model}/moe"


# from the models' config.json (num_local_experts / num_experts, num_experts_per_tok, hidden_size,
# intermediate_size / moe_intermediate_size); one rank holding every expert (no TP / EP split)
MOE_MODELS: dict[str, MoEShape] = {
    "mixtral-8x7b": MoEShape("mixtral-8x7b", experts=8, top_k=2, hidden=4096, intermediate=14336),
    "qwen3-30b-a3b": MoEShape("qwen3-30b-a3b", experts=128, top_k=8, hidden=2048, intermediate=768),
}
MOE_M_SWEEP = (1, 4, 16, 64, 256, 1024, 4096)  # tokens per MoE layer call
MOE_M_SWEEP_TINY = (1, 7, 33)


def moe_shapes(scale: int = 1) -> list[MoEShape]:
    """The MoE layers of :data:`MOE_MODELS`; ``scale`` > 1 divides H and I (at least 32, the
    quantization block, so tiny shapes stay multiples of 32 where the full ones are)."""
    return [MoEShape(m.model, m.experts, m.top_k, max(32, m.hidden // scale), max(32, m.intermediate // scale))
            for m in MOE_MODELS.values()]  # fmt: skip


def model_names(spec: str) -> list[str]:
    """``all`` or a comma-separated list of :data:`MODELS` keys."""
    names = list(MODELS) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise ValueError(f"unknown model shapes {unknown or spec!r}; choose from {list(MODELS)} or 'all'")
    return names


# ------------------------------------------------------------------------------------------------
# attention steps
# ------------------------------------------------------------------------------------------------


@dataclass
class AttnCase:
    """One attention step: per stage ``query_lens[s]`` new tokens over ``seq_lens[s]`` KV columns
    (history = seq_len - query_len), causal within the new tokens."""

    name: str
    group: str  # mixed | prefix | chunked | verify | decode
    query_lens: list[int]
    seq_lens: list[int]
    params: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


# lognormal (median, sigma) of prompt and output lengths
LENGTH_MIXES = {
    "coding": {"prompt": (1800, 0.8), "output": (120, 0.9)},
    "conversation": {"prompt": (300, 1.0), "output": (350, 0.8)},
}


def mixed_step(
    mix: str, budget: int, max_seqs: int, seed: int = 0, scale: int = 1, spec_every: int = 4, draft: int = 3
) -> AttnCase:
    """A steady-state step of a token-budget scheduler: requests with lengths drawn from ``mix``
    (medians divided by ``scale``) are caught at a random point of their life; those past their
    prompt decode (every ``spec_every``-th one verifies ``1 + draft`` tokens instead), then prefill
    chunks of the others fill the rest of ``budget`` (the last chunk truncated)."""
    rng = random.Random(seed)
    m = LENGTH_MIXES[mix]

    def draw(kind: str) -> int:
        median, sigma = m[kind]
        return max(1, int(rng.lognormvariate(math.log(median / scale), sigma)))

    decodes, prefills = [], []
    while len(decodes) + len(prefills) < max_seqs:
        prompt, output = draw("prompt"), draw("output")
        at = rng.randrange(prompt + output)
        if at >= prompt:
            q = 1 + draft if (len(decodes) + 1) % spec_every == 0 else 1
            decodes.append((q, at + q))
        else:
            prefills.append((prompt - at, at))  # (remaining prompt, history)
    qls, sls, used = [], [], 0
    for q, s in decodes:
        if used + q > budget:
            break
        qls.append(q)
        sls.append(s)
        used += q
    for rest, hist in prefills:
        if used >= budget:
            break
        q = min(rest, budget - used)
        qls.append(q)
        sls.append(hist + q)
        used += q
    params = {"mix": mix, "budget": budget, "decodes": sum(q == 1 for q in qls), "stages": len(qls)}
    return AttnCase(f"mixed_{mix}", "mixed", qls, sls, params)


def attention_cases(tiny: bool) -> list[AttnCase]:
    """The step mixes of the kernel benchmark (``tiny``: the same kinds, scaled down)."""
    if tiny:
        budget, prefix, chunk, hists, dec_b, dec_ctx, max_seqs = 64, (0, 32), 32, (32, 96), (2, 4), (16, 48), 8
        verify = ((2, 7),)
    else:
        budget, prefix, chunk, hists, dec_b, dec_ctx, max_seqs = (
            4096, (0, 512, 1024, 2048, 4096), 2048, (6144, 14336, 30720), (8, 32, 128), (128, 1024, 4096), 256,
        )  # fmt: skip
        verify = ((4, 31), (8, 15))
    cases = [mixed_step(mix, budget, max_seqs, scale=TINY_SCALE if tiny else 1) for mix in LENGTH_MIXES]
    q_prefix = budget // 4
    for p in prefix:
        cases.append(AttnCase(f"prefix_{p}", "prefix", [q_prefix] * 4, [q_prefix + p] * 4, {"prefix": p}))
    for h in hists:
        cases.append(AttnCase(f"chunked_{h + chunk}", "chunked", [chunk], [h + chunk], {"history": h, "chunk": chunk}))
    ctx = dec_ctx[len(dec_ctx) // 2]
    for b, d in verify:
        cases.append(AttnCase(f"verify_{b}x{d}", "verify", [d + 1] * b, [ctx + d + 1] * b, {"batch": b, "draft": d}))
    for b in dec_b:
        for c in dec_ctx:
            cases.append(AttnCase(f"decode_b{b}_c{c}", "decode", [1] * b, [c] * b, {"batch": b, "context": c}))
    return cases
