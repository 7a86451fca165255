"""RMSNorm with an optional fused residual add.

Torch reference: ``portable_xy.backends.reference.rms_norm_ref`` (semantics of ``Backend.rms_norm``)::

    r = x + residual            (in x.dtype; only with a residual, and returned)
    y = (r.float() * rsqrt(mean(r.float()^2) + eps)).to(x.dtype) * weight

Shapes and layouts
    x         [T, D] or [T, H, D] (e.g. per-head q/k norm on a strided view of the QKV output);
              the last dim must be contiguous, the others may have any stride
    residual  same shape as x (any strides, last dim contiguous), optional
    weight    [D]
    y         x's shape, contiguous, dtype promote(x.dtype, weight.dtype) like torch
    r         x's shape, contiguous, x.dtype (only with a residual)

One program normalises rows ``pid, pid + num_programs, ...`` (``num_programs`` = rows on CUDA,
the vector-core count on Ascend, see :func:`support_programs`). A row is processed in chunks of
BLOCK_D elements: pass 1 accumulates the sum of squares (and writes ``r``), pass 2 recomputes
``x + residual`` from the inputs (no read-after-write of ``r``) and writes ``y``.

Constexprs: BLOCK_D (chunk, power of two), HAS_RESIDUAL.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch_options, support_programs


@triton.jit
def rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, r_out_ptr,
    n_rows, H, D, stride_xt, stride_xh, stride_rt, stride_rh, eps, num_programs,
    BLOCK_D: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    for row in tl.range(pid, n_rows, num_programs):
        t = row // H
        h = row % H
        x_row = x_ptr + tl.cast(t, tl.int64) * stride_xt + h * stride_xh
        r_row = res_ptr + tl.cast(t, tl.int64) * stride_rt + h * stride_rh
        out_row = tl.cast(row, tl.int64) * D
        # pass 1: sum of squares (the residual sum is written out here)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            mask = cols < D - d0
            x = tl.load(x_row + d0 + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                x = x + tl.load(r_row + d0 + cols, mask=mask, other=0.0)
                tl.store(r_out_ptr + out_row + d0 + cols, x, mask=mask)
            xf = x.to(tl.float32)
            acc += xf * xf
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / D + eps)
        # pass 2: normalise, cast back to x's dtype, scale by the weight
        for d0 in range(0, D, BLOCK_D):
            mask = cols < D - d0
            x = tl.load(x_row + d0 + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                x = x + tl.load(r_row + d0 + cols, mask=mask, other=0.0)
            w = tl.load(w_ptr + d0 + cols, mask=mask, other=0.0)
            y = (x.to(tl.float32) * rstd).to(x_ptr.dtype.element_ty) * w
            tl.store(y_ptr + out_row + d0 + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows_view(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, H, stride_t, stride_h) for a [T, D] or [T, H, D] tensor with a unit last stride."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t, 1, t.stride(0), 0
    if t.dim() == 3:
        return t, t.shape[1], t.stride(0), t.stride(1)
    t = t.reshape(-1, t.shape[-1])
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t, 1, t.stride(0), 0


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    profile=None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as ``Backend.rms_norm``; inputs are not modified. ``out`` / ``residual_out``:
    optional contiguous destinations."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match last dim {D}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    y_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = out if out is not None else torch.empty(x.shape, dtype=y_dtype, device=x.device)
    r_out = None
    if residual is not None:
        r_dtype = torch.promote_types(x.dtype, residual.dtype)  # an fp32 residual stream stays fp32
        r_out = residual_out if residual_out is not None else torch.empty(x.shape, dtype=r_dtype, device=x.device)
    for t, what in ((y, "out"), (r_out, "residual_out")):
        if t is not None and (t.shape != x.shape or not t.is_contiguous()):
            raise ValueError(f"rms_norm: {what} must be contiguous with shape {tuple(x.shape)}")
    xv, H, sxt, sxh = _rows_view(x)
    n_rows = x.numel() // D
    if n_rows == 0:
        return y, r_out
    if residual is not None:
        rv, _, srt, srh = _rows_view(residual)  # same shape as x, so the same row decomposition
    else:
        rv, srt, srh = xv, 0, 0
    s = (profile.data.get("support") or {}) if profile is not None else {}
    block_d = min(triton.next_power_of_2(D), int(s.get("block_d", 4096)))
    progs = support_programs(n_rows, profile) if profile is not None else n_rows
    rms_norm_kernel[(progs,)](
        xv, rv, weight, y, r_out if r_out is not None else y,
        n_rows, H, D, sxt, sxh, srt, srh, float(eps), progs,
        BLOCK_D=block_d, HAS_RESIDUAL=residual is not None,
        **(launch_options(profile) if profile is not None else {}),
    )  # fmt: skip
    return y, r_out
