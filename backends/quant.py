"""Weight-only quantized GEMM weights: GGUF's Q4_0 / Q4_1 / Q8_0 blocks, repacked once at load.

Every supported type is stored as unsigned quants with a per-32 scale and min, so one family of
kernels (C on CPU, Triton on GPU / NPU) serves all three:

    w[n, 32 b + j] = d[n, b] * q[n, 32 b + j] + m[n, b]      (computed in fp32)

    type   bits  q                          m
    Q4_0   4     GGUF's nibble (0..15)      -8 d
    Q4_1   4     GGUF's nibble              GGUF's min
    Q8_0   8     GGUF's int8 + 128 (0..255) -128 d

The sums are exact in fp32 (``d`` is fp16 and ``q`` has at most 8 bits), so :func:`dequantize_ref`
equals GGUF's own dequantization bit for bit.

Layout (separate, contiguous arrays; a row of the weight is one output feature):
    qs  uint8 ``[N, K / 2]`` (4 bits: byte ``16 b + j`` of a row holds element ``32 b + j`` in its
        low nibble and ``32 b + j + 16`` in its high nibble, GGUF's order) or ``[N, K]`` (8 bits)
    d   fp16 ``[N, K / 32]``
    m   fp16 ``[N, K / 32]``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QBLOCK = 32  # elements per scale / min
QTYPES = {"q4_0": 4, "q4_1": 4, "q8_0": 8}  # GGUF type -> bits per quant


@dataclass(frozen=True)
class QuantWeight:
    """A ``[n, k]`` GEMM weight in the layout above (``k`` a multiple of 32)."""

    qtype: str
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    n: int
    k: int

    @property
    def bits(self) -> int:
        return QTYPES[self.qtype]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m))

    def to(self, device: torch.device | str) -> QuantWeight:
        return QuantWeight(self.qtype, self.qs.to(device), self.d.to(device), self.m.to(device), self.n, self.k)

    def rows(self, start: int, stop: int) -> QuantWeight:
        """Rows ``[start, stop)`` (views)."""
        qs, d, m = self.qs[start:stop], self.d[start:stop], self.m[start:stop]
        return QuantWeight(self.qtype, qs, d, m, stop - start, self.k)

    def cols(self, start: int, stop: int) -> QuantWeight:
        """Columns ``[start, stop)``, on block boundaries (copies)."""
        if start % QBLOCK or stop % QBLOCK:
            raise ValueError(f"quantized weight columns [{start}, {stop}) do not fall on {QBLOCK}-blocks")
        per = self.bits // 4 * QBLOCK // 2  # bytes of qs per block
        b0, b1 = start // QBLOCK, stop // QBLOCK
        return QuantWeight(
            self.qtype,
            self.qs[:, b0 * per : b1 * per].contiguous(),
            self.d[:, b0:b1].contiguous(),
            self.m[:, b0:b1].contiguous(),
            self.n,
            stop - start,
        )

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight:
        """Row-wise concatenation (the fused QKV and gate-up weights)."""
        first = parts[0]
        if any(p.qtype != first.qtype or p.k != first.k for p in parts):
            raise ValueError("only quantized weights of one type and width can be concatenated")
        return QuantWeight(
            first.qtype,
            torch.cat([p.qs for p in parts]),
            torch.cat([p.d for p in parts]),
            torch.cat([p.m for p in parts]),
            sum(p.n for p in parts),
            first.k,
        )


def unpack_quants(w: QuantWeight) -> torch.Tensor:
    """The quants ``q`` as uint8 ``[N, K]`` in element order."""
    if w.bits == 8:
        return w.qs
    blocks = w.qs.reshape(w.n, w.k // QBLOCK, QBLOCK // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(w.n, w.k)


def dequantize_ref(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, K]`` weights ``d * q + m`` (fp32 arithmetic), cast to ``dtype``: the oracle of every
    quantized kernel."""
    q = unpack_quants(w).float().view(w.n, w.k // QBLOCK, QBLOCK)
    out = q * w.d.float()[..., None] + w.m.float()[..., None]
    return out.reshape(w.n, w.k).to(dtype)


def quantize_ref(weight: torch.Tensor, qtype: str) -> QuantWeight:
    """Quantize a float ``[N, K]`` weight (K a multiple of 32) the way GGUF's reference quantizers
    do (round to nearest per 32-block), for tests and random-weight models."""
    if qtype not in QTYPES:
        raise ValueError(f"unknown quantization type {qtype!r}; supported: {sorted(QTYPES)}")
    n, k = weight.shape
    if k % QBLOCK:
        raise ValueError(f"a quantized weight needs K divisible by {QBLOCK}, got K={k}")
    x = weight.detach().float().reshape(n, k // QBLOCK, QBLOCK)
    if qtype == "q4_1":
        lo, hi = x.amin(-1), x.amax(-1)
        d = ((hi - lo) / 15).half()
        inv = torch.where(d.float() != 0, 1 / d.float(), torch.zeros_like(lo))
        q = ((x - lo[..., None]) * inv[..., None]).round().clamp(0, 15)
        m = lo.half()
    else:
        top = 7 if qtype == "q4_0" else 127
        amax_idx = x.abs().argmax(-1, keepdim=True)
        peak = x.gather(-1, amax_idx)[..., 0]  # signed value of largest magnitude
        d = ((peak / -8) if qtype == "q4_0" else (peak.abs() / top)).half()
        inv = torch.where(d.float() != 0, 1 / d.float(), torch.zeros_like(peak))
        offset = 8 if qtype == "q4_0" else 128
        q = ((x * inv[..., None]).round() + offset).clamp(0, 15 if qtype == "q4_0" else 255)
        m = (-offset * d.float()).half()
    q = q.to(torch.uint8).reshape(n, k)
    if QTYPES[qtype] == 4:
        blocks = q.view(n, k // QBLOCK, QBLOCK)
        qs = (blocks[..., : QBLOCK // 2] | (blocks[..., QBLOCK // 2 :] << 4)).reshape(n, k // 2)
    else:
        qs = q
    return QuantWeight(qtype, qs.contiguous(), d.contiguous(), m.contiguous(), n, k)
