"""SiLU-and-mul (the gated MLP activation of Llama-family models).

Torch reference: ``portable_xy.backends.reference.silu_and_mul_ref``::

    gate, up = x.chunk(2, -1);  y = silu(gate) * up      # silu computed in fp32, rounded to
                                                          # x.dtype, then multiplied in x.dtype
Shapes and layouts
    x  [M, 2I]  row stride arbitrary, unit column stride (the fused gate_up GEMM output)
    y  [M, I]   contiguous, x.dtype

The work is split into tasks (row, column block of BLOCK_I); one program handles tasks
``pid, pid + num_programs, ...`` (one task per program on CUDA; vector cores on Ascend).

Constexprs: BLOCK_I.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch_options, support_programs


@triton.jit
def silu_and_mul_kernel(x_ptr, y_ptr, n_rows, n_cols, stride_xm, stride_ym, num_programs, BLOCK_I: tl.constexpr):
    pid = tl.program_id(0)
    n_cb = tl.cdiv(n_cols, BLOCK_I)
    cols = tl.arange(0, BLOCK_I)
    for task in tl.range(pid, n_rows * n_cb, num_programs):
        row = tl.cast(task // n_cb, tl.int64)
        c0 = (task % n_cb) * BLOCK_I
        mask = cols < n_cols - c0
        gate = tl.load(x_ptr + row * stride_xm + c0 + cols, mask=mask, other=0.0)
        up = tl.load(x_ptr + row * stride_xm + n_cols + c0 + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty)
        tl.store(y_ptr + row * stride_ym + c0 + cols, silu * up, mask=mask)


def silu_and_mul(x: torch.Tensor, profile=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., 2I] -> silu(x[..., :I]) * x[..., I:]``."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim {x.shape[-1]} is odd")
    lead, n_cols = x.shape[:-1], x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        y = torch.empty((M, n_cols), dtype=x.dtype, device=x.device)
    else:
        y = out.reshape(M, n_cols)
        if y.stride(-1) != 1 or y.dtype != x.dtype or y.data_ptr() != out.data_ptr():
            raise ValueError("silu_and_mul: out must have x's dtype, shape [..., I] and a unit last stride")
    if M == 0 or n_cols == 0:
        return y.reshape(*lead, n_cols)
    s = (profile.data.get("support") or {}) if profile is not None else {}
    block_i = min(triton.next_power_of_2(n_cols), int(s.get("block_i", 1024)))
    tasks = M * triton.cdiv(n_cols, block_i)
    progs = support_programs(tasks, profile) if profile is not None else tasks
    silu_and_mul_kernel[(progs,)](
        x2, y, M, n_cols, x2.stride(0), y.stride(0), progs, BLOCK_I=block_i,
        **(launch_options(profile) if profile is not None else {}),
    )  # fmt: skip
    return y.reshape(*lead, n_cols)
