"""Device peaks and the roofline cost model.

One model serves every estimate in the project: the SmoothGEMM planner
(``triton_kernels/gemm_plan.py``), the offline tuner's dry-run timer, the padding analysis and the
serving simulator (``portable_xy.tools``). A kernel that does ``F`` FLOPs and moves ``B`` bytes
takes ``max(F / (peak_flops * flops_eff), B / (peak_bw * bw_eff))``.

Peaks come from a profile's ``device`` section: ``peak_tflops`` per dtype (``fp16``, ``bf16``,
``fp32``) and ``peak_gbps``. Where a profile has none (the ``cpu`` profile), the planner uses
neutral placeholders (:data:`PLACEHOLDER_TFLOPS`, :data:`PLACEHOLDER_GBPS`): only ratios between
its candidate plans matter there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PLACEHOLDER_TFLOPS = 1.0
PLACEHOLDER_GBPS = 100.0
_KEYS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", 2: "fp16", 4: "fp32"}


@dataclass(frozen=True)
class Peaks:
    """FLOP/s and bytes/s of one device."""

    flops: float
    bw: float

    def time(self, flops: float, nbytes: float, flops_eff: float = 1.0, bw_eff: float = 1.0) -> float:
        """Roofline seconds of one kernel: compute- or memory-bound, whichever is slower."""
        return max(flops / (self.flops * flops_eff), nbytes / (self.bw * bw_eff))


def datasheet_peaks(profile, dtype: torch.dtype | int = 2) -> tuple[float | None, float | None]:
    """``(peak TFLOP/s, peak GB/s)`` the profile states for ``dtype`` (a torch dtype or an element
    size in bytes; fp16's figure when the dtype has none); ``None`` where it states nothing."""
    dev = profile.data.get("device") or {}
    tf = dev.get("peak_tflops") or {}
    tflops = tf.get(_KEYS.get(dtype, "fp16")) or tf.get("fp16")
    gbps = dev.get("peak_gbps")
    return (float(tflops) if tflops else None), (float(gbps) if gbps else None)


def peaks(profile, dtype: torch.dtype | int = 2) -> Peaks:
    """The profile's peaks for ``dtype``, placeholders where it states none."""
    tflops, gbps = datasheet_peaks(profile, dtype)
    return Peaks((tflops or PLACEHOLDER_TFLOPS) * 1e12, (gbps or PLACEHOLDER_GBPS) * 1e9)


def gemm_cost(tokens: int, n: int, k: int, elem_bytes: int = 2) -> tuple[float, float]:
    """``(FLOPs, bytes)`` of ``[tokens, k] x [k, n]`` with the weight read once."""
    return 2.0 * tokens * n * k, float(elem_bytes * (n * k + tokens * k + tokens * n))


def attention_cost(
    stages: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, elem_bytes: int = 2
) -> tuple[float, float]:
    """``(FLOPs, bytes)`` of one layer's attention over ``(new tokens q, history h)`` stages: QK^T and
    S*V over the causal area (token ``i`` sees ``h + i`` keys), K and V read for ``h + q``
    positions, Q in and O out."""
    flops = nbytes = 0.0
    for q, h in stages:
        flops += 4.0 * head_dim * num_heads * (q * h + q * (q + 1) / 2)
        nbytes += elem_bytes * (2 * num_kv_heads * head_dim * (h + q) + 2 * num_heads * head_dim * q)
    return flops, nbytes


def gemm_waves_time(
    rows: int,
    n: int,
    k: int,
    block: tuple[int, int, int],
    cores: int,
    device: Peaks,
    elem_bytes: int = 2,
    core_bw_share: float = 2.0,
    tile_overhead_s: float = 0.0,
) -> tuple[float, int, int]:
    """Seconds of ``rows x n x k`` on tiles ``block = (BM, BN, BK)`` spread over ``cores`` in waves,
    and the tile grid ``(tiles_m, tiles_n)``. A wave of ``w`` tiles takes the roofline time of one
    tile, with the padded rows computed but never read, at a bandwidth of
    ``min(peak, w * core_bw_share * peak / cores)`` (few busy cores pull less), plus
    ``tile_overhead_s``."""
    bm, bn, _ = block
    tiles_m, tiles_n = math.ceil(rows / bm), math.ceil(n / bn)
    total = tiles_m * tiles_n
    t_compute = 2.0 * bm * bn * k / (device.flops / cores)
    real_rows = min(bm, rows / tiles_m)  # selective read: average real rows per tile
    full, last = divmod(total, cores)
    t = 0.0
    for in_wave, count in ((cores, full), (last, 1 if last else 0)):
        if count:
            wave_bw = min(device.bw, in_wave * core_bw_share * device.bw / cores)
            t_mem = in_wave * (real_rows + bn) * k * elem_bytes / wave_bw
            t += count * (max(t_compute, t_mem) + tile_overhead_s)
    return t, tiles_m, tiles_n
