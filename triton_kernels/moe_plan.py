"""Host side of the fused-MoE kernel (:mod:`.fused_moe`): assignments sorted by expert, per-expert
SmoothGEMM tile plans, and the task tables the grouped GEMMs walk.

Pure host code (torch + Python, no Triton import), run once per MoE layer call.

Assignments
    ``topk_ids [T, k]`` holds ``T * k`` assignments; assignment ``a = t * k + j`` (its *slot*)
    sends token ``t`` to expert ``topk_ids[t, j]``. Only the local experts ``expert_start ..
    expert_start + E - 1`` count. One stable sort by expert gives ``sorted_ids`` (int32 ``[A]``,
    ``A`` local assignments: the slots of expert 0, then of expert 1, ..., tokens ascending within
    an expert) and one host read gives the per-expert counts; expert ``e`` owns sorted rows
    ``offsets[e] : offsets[e + 1]`` (:func:`expert_offsets`).

Per-expert tiles (the SmoothGEMM planner, :func:`.gemm_plan.plan_gemm`)
    Expert ``e`` with ``c_e`` rows gets ``plan_gemm(c_e, N, K, profile, objective="padding")``: up
    to ``gemm.max_segments`` segments, each on one menu tile, and only the last tile of its last
    segment is partly empty. So a decode step (1 row per chosen expert) runs 16-row tiles while a
    prefill expert with 300 rows may run 256 rows on 64-row tiles + 44 rows on 16-row tiles. The
    objective is the fewest executed MACs (then the cheapest plan), not the planner's time model:
    that model costs one GEMM alone on the device, where a memory-bound GEMM's padded rows are
    free; the experts share one launch, so their padded rows take compute from the others
    (``portable-xy bench moe-padding`` compares both).

Task tables
    One *task* is one BLOCK_M row tile of one expert: int32 ``(expert, row0, rows)`` with ``row0``
    its first sorted row and ``rows <= BLOCK_M`` its real rows (virtual padding: the kernel masks
    rows past ``rows``; no padded copy of anything exists). A GEMM's tasks are grouped by menu tile
    (tile order of the menu, experts ascending within a tile) and each group is one launch of
    ``num_tasks * ceil(N / BLOCK_N)`` programs (``num_cores`` on persistent profiles), because
    BLOCK_M / BLOCK_N / BLOCK_K are constexprs. The gate-up GEMM (``N = 2I, K = H``) and the down
    GEMM (``N = H, K = I``) have their own plans and tables, stored in one int32 device tensor.

Compared with vLLM's ``moe_align_block_size``: vLLM rounds every expert's count up to one global
BLOCK_M and writes sentinel slots into a padded id list sized for the worst case (``T k + E
(BLOCK_M - 1)``); here each expert's tile is planned from its own count, the id list holds only
real slots, and a tile's padding exists only as a row mask. ``executed_macs`` / ``useful_macs``
measure what padding remains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backends.quant import QuantWeight
from .gemm_plan import GemmPlan, GemmTile, plan_gemm, single_tile_plan

TASK_FIELDS = ("expert", "row0", "rows")


@dataclass(frozen=True)
class MoELaunch:
    """One launch of a grouped GEMM: tasks ``task_start : task_start + num_tasks`` of its table,
    all on ``tile``; ``programs`` is the grid size (``num_tasks * tiles_n`` unless persistent)."""

    tile: GemmTile
    task_start: int
    num_tasks: int
    tiles_n: int
    programs: int


@dataclass(frozen=True)
class MoEGemmPlan:
    """The tile plan of one grouped GEMM (``[c_e, K] x [N, K]^T`` for every local expert ``e``)."""

    N: int
    K: int
    expert_plans: tuple[GemmPlan | None, ...]  # per local expert; None: no rows
    tasks: tuple[tuple[int, int, int], ...]  # (expert, row0, rows), grouped by launch
    launches: tuple[MoELaunch, ...]
    persistent: bool
    group_m: int

    @property
    def useful_macs(self) -> int:
        return sum(p.useful_macs for p in self.expert_plans if p is not None)

    @property
    def executed_macs(self) -> int:
        """MACs the tiles perform, padding included (an expert's row tail, N tail, K tail)."""
        return sum(p.executed_macs for p in self.expert_plans if p is not None)

    @property
    def padded_rows(self) -> int:
        return sum(p.padded_rows for p in self.expert_plans if p is not None)

    def describe(self) -> str:
        launches = " + ".join(f"{ln.num_tasks}t@{ln.tile.name}" for ln in self.launches) or "none"
        return f"N={self.N} K={self.K}: {launches} | pad_rows={self.padded_rows}"


@dataclass
class MoEPlan:
    """Everything the fused-MoE launches of one call need (see the module doc)."""

    num_tokens: int
    top_k: int
    expert_start: int
    counts: tuple[int, ...]  # rows per local expert
    offsets: tuple[int, ...]  # [E + 1]: expert e owns sorted rows offsets[e]:offsets[e + 1]
    gate_up: MoEGemmPlan
    down: MoEGemmPlan
    sorted_ids: torch.Tensor | None = None  # int32 [A] slots sorted by expert (device)
    task_table: torch.Tensor | None = None  # int32 [tasks(gate_up) + tasks(down), 3] (device)

    @property
    def num_experts(self) -> int:
        return len(self.counts)

    @property
    def num_assignments(self) -> int:
        return self.offsets[-1]

    @property
    def useful_macs(self) -> int:
        return self.gate_up.useful_macs + self.down.useful_macs

    @property
    def executed_macs(self) -> int:
        return self.gate_up.executed_macs + self.down.executed_macs

    @property
    def efficiency(self) -> float:
        return self.useful_macs / self.executed_macs if self.executed_macs else 1.0

    def describe(self) -> str:
        return (f"T={self.num_tokens} k={self.top_k} A={self.num_assignments} experts={sum(c > 0 for c in self.counts)}"
                f"/{self.num_experts} | gate_up {self.gate_up.describe()} | down {self.down.describe()} | "
                f"eff={self.efficiency:.3f}")  # fmt: skip


def expert_offsets(counts: list[int] | tuple[int, ...]) -> list[int]:
    """Exclusive prefix sum ``[0, c_0, c_0 + c_1, ..., A]`` of the per-expert row counts."""
    out = [0]
    for c in counts:
        out.append(out[-1] + int(c))
    return out


def plan_grouped_gemm(
    offsets: list[int] | tuple[int, ...], N: int, K: int, profile, elem_bytes: int = 2, tile: GemmTile | None = None
) -> MoEGemmPlan:
    """The grouped GEMM's per-expert plans (``plan_gemm`` of each expert's count, or every row on
    ``tile``) and its task table grouped into one launch per menu tile."""
    g = profile.gemm
    cores = max(1, int(profile.num_cores))
    persistent = bool(g.get("persistent", False))
    plans: list[GemmPlan | None] = []
    by_tile: dict[GemmTile, list[tuple[int, int, int]]] = {}
    for e in range(len(offsets) - 1):
        rows = offsets[e + 1] - offsets[e]
        if rows <= 0:
            plans.append(None)
            continue
        p = plan_gemm(rows, N, K, profile, elem_bytes, "padding") if tile is None else single_tile_plan(
            rows, N, K, tile, profile, elem_bytes)  # fmt: skip
        plans.append(p)
        for s in p.segments:
            bm = s.tile.BLOCK_M
            for i in range(s.tiles_m):
                r0 = s.m_start + i * bm
                by_tile.setdefault(s.tile, []).append((e, offsets[e] + r0, min(bm, s.m_rows - i * bm)))
    order = {GemmTile.from_dict(t): i for i, t in enumerate(g["tiles"])}
    tasks: list[tuple[int, int, int]] = []
    launches = []
    for t in sorted(by_tile, key=lambda t: (order.get(t, len(order)), t.BLOCK_M, t.BLOCK_N)):
        group = by_tile[t]
        tiles_n = math.ceil(N / t.BLOCK_N)
        n = len(group) * tiles_n
        launches.append(MoELaunch(t, len(tasks), len(group), tiles_n, min(cores, n) if persistent else n))
        tasks.extend(group)
    return MoEGemmPlan(N, K, tuple(plans), tuple(tasks), tuple(launches), persistent, int(g.get("group_m", 1)))


def plan_moe_counts(
    counts: list[int] | tuple[int, ...],
    gate_up: tuple[int, int],
    down: tuple[int, int],
    profile,
    elem_bytes: int = 2,
    num_tokens: int = 0,
    top_k: int = 1,
    expert_start: int = 0,
    tile: GemmTile | None = None,
) -> MoEPlan:
    """The host plan for given per-expert row counts (no tensors: analysis code can cost any
    routing). ``gate_up`` / ``down``: ``(N, K)`` of the two GEMMs; ``tile``: every expert on this
    tile instead of its planned ones (a one-tile baseline)."""
    offsets = expert_offsets(counts)
    counts = tuple(b - a for a, b in zip(offsets, offsets[1:]))
    return MoEPlan(
        num_tokens, top_k, expert_start, counts, tuple(offsets),
        plan_grouped_gemm(offsets, *gate_up, profile, elem_bytes, tile),
        plan_grouped_gemm(offsets, *down, profile, elem_bytes, tile),
    )  # fmt: skip


def plan_moe(
    topk_ids: torch.Tensor,
    num_experts: int,
    expert_start: int,
    gate_up: tuple[int, int],
    down: tuple[int, int],
    profile,
    elem_bytes: int = 2,
    tile: GemmTile | None = None,
) -> MoEPlan:
    """Sort the assignments of ``topk_ids [T, k]`` by local expert on their device (one stable
    sort, one host read of the counts), plan both GEMMs (:func:`plan_moe_counts`) and upload the
    task tables."""
    T, k = topk_ids.shape
    key = (topk_ids.reshape(-1).long() - expert_start).clamp(-1, num_experts)  # -1 / E: not local
    order = torch.argsort(key, stable=True)
    hist = torch.bincount(key + 1, minlength=num_experts + 2).tolist()
    plan = plan_moe_counts(hist[1:-1], gate_up, down, profile, elem_bytes, T, k, expert_start, tile)
    first = hist[0]
    plan.sorted_ids = order[first : first + plan.num_assignments].to(torch.int32)
    tasks = plan.gate_up.tasks + plan.down.tasks
    plan.task_table = torch.tensor(tasks or [(0, 0, 0)], dtype=torch.int32).to(topk_ids.device)
    return plan


def stack_experts(weights: list[object]) -> torch.Tensor | QuantWeight | None:
    """Per-expert ``[N, K]`` weights as one ``[E, N, K]`` tensor, or one QuantWeight whose ``qs``,
    ``d``, ``m`` are stacked ``[E, N, ...]`` (its ``n``, ``k`` stay per expert); None when they do
    not stack (mixed kinds, dtypes, shapes or quantization types, or no weights)."""
    if not weights:
        return None
    first = weights[0]
    if all(isinstance(w, torch.Tensor) for w in weights):
        same = all(w.shape == first.shape and w.dtype == first.dtype and w.device == first.device for w in weights)
        return torch.stack(weights) if same and first.dim() == 2 else None
    if all(isinstance(w, QuantWeight) for w in weights):
        if any((w.qtype, w.n, w.k) != (first.qtype, first.n, first.k) for w in weights):
            return None
        qs, d, m = (torch.stack([getattr(w, f) for w in weights]) for f in ("qs", "d", "m"))
        return QuantWeight(first.qtype, qs, d, m, first.n, first.k)
    return None


def unstack_experts(w: torch.Tensor | QuantWeight | list) -> list:
    """The per-expert weights of :func:`stack_experts`'s result (a list is returned as it is)."""
    if isinstance(w, list):
        return w
    if isinstance(w, QuantWeight):
        return [QuantWeight(w.qtype, w.qs[e], w.d[e], w.m[e], w.n, w.k) for e in range(w.qs.shape[0])]
    return list(w.unbind(0))
