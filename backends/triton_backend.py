"""Triton backends: one per platform whose kernels are Triton kernels (``backends/platforms/``).

Every one runs the same kernels from ``portable_xy.triton_kernels`` (SmoothGEMM, RMSNorm, RoPE,
SiLU-and-mul, KV store, sampling, fused MoE, and the Meta-Attention module) with a per-vendor, per-arch
profile; the platform names the device, its architecture (hence the profile file) and its core
count (SMs on NVIDIA, CUs on AMD, AI cores on Ascend).

The interpreter platform (``interpret``) runs them with ``TRITON_INTERPRET=1`` on CPU tensors.
Triton decides at ``@triton.jit`` decoration time whether a kernel is interpreted -- for its own
standard library too (``tl.sum``, ``tl.cdiv`` are jit functions created when ``triton`` is
imported) -- so the variable is set here *before* triton and the kernel modules are imported
(nothing in ``portable_xy`` imports triton earlier). If triton or the kernels were already
imported without it, this raises a clear error instead of failing inside a kernel. fp32/fp16
only: the interpreter has no bfloat16.

Kernel modules are imported lazily (inside :func:`make_triton_backend`), and the Meta-Attention
module only when attention is first planned or run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import SimpleNamespace

import torch

from .. import envs
from .base import AttnMetadata, Backend
from .platforms import PLATFORMS, get_platform
from .profile import Profile
from .quant import QuantWeight

_KERNELS = ("smooth_gemm", "quant_gemm", "rms_norm", "rope", "activation", "kv_cache", "sampling", "fused_moe")
_PKG = "portable_xy.triton_kernels"


def _imported_kernel_mode() -> str | None:
    """How the already-imported kernel modules' ``@triton.jit`` functions were created:
    ``"interpret"``, ``"compiled"`` or ``None`` (none imported yet)."""
    mods = [m for n, m in list(sys.modules.items()) if n.startswith(_PKG + ".") and m is not None]
    if not mods:
        return None
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for mod in mods:
        for obj in vars(mod).values():
            if isinstance(obj, InterpretedFunction):
                return "interpret"
            if isinstance(obj, JITFunction):
                return "compiled"
    return None


def _triton_mode() -> str | None:
    """How Triton's own standard library (``tl.sum``, ``tl.cdiv``... are ``@triton.jit`` functions)
    was created: ``"interpret"``, ``"compiled"`` or ``None`` (triton not imported yet)."""
    std = sys.modules.get("triton.language.standard")
    if std is None:
        return None
    return "interpret" if type(getattr(std, "sum", None)).__name__ == "InterpretedFunction" else "compiled"


def _load_kernels(interpret: bool) -> SimpleNamespace:
    if interpret and "triton" not in sys.modules:
        envs.set_triton_interpret(True)  # before the checks below import triton
    mode = _imported_kernel_mode()
    if interpret:
        if mode == "compiled" or _triton_mode() == "compiled":
            what = "portable_xy.triton_kernels" if mode == "compiled" else "triton"
            raise RuntimeError(
                f"backend 'interpret': {what} was already imported while TRITON_INTERPRET was not '1'. Triton "
                "decides when a @triton.jit function is created (its own tl.sum, tl.cdiv... included) whether "
                "it is interpreted, so set TRITON_INTERPRET=1 before anything imports triton (e.g. in the "
                "environment of the process), or use a fresh process."
            )
        envs.set_triton_interpret(True)
    else:
        if envs.triton_interpret() or mode == "interpret" or _triton_mode() == "interpret":
            raise RuntimeError(
                "TRITON_INTERPRET=1 is set (or the kernels were imported under it): Triton kernels in this "
                "process run in the CPU interpreter. Unset TRITON_INTERPRET and use a fresh process for a "
                "device backend, or use backend 'interpret'."
            )
    ns = SimpleNamespace(**{k: importlib.import_module(f"{_PKG}.{k}") for k in _KERNELS})
    got = _imported_kernel_mode()
    if got is not None and got != ("interpret" if interpret else "compiled"):
        raise RuntimeError(f"Triton kernels were created in {got!r} mode, which does not match this backend")
    return ns


class TritonBackend(Backend):
    """Every op is a Triton kernel; attention is Meta-Attention (``triton_kernels.meta_attention``)."""

    static_decode = True

    def __init__(self, name: str, device: torch.device, profile: Profile, kernels: SimpleNamespace) -> None:
        super().__init__(device, profile)
        self.name = name
        self.k = kernels
        self.supports_bf16 = bool((profile.data.get("supports") or {}).get("bf16", True))

    # ---- dtype guard -------------------------------------------------------------------------
    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return dtype in (torch.float32, torch.float16) or (dtype == torch.bfloat16 and self.supports_bf16)

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype == torch.bfloat16 and not self.supports_bf16:
            raise TypeError(
                f"backend {self.name!r} does not support bfloat16 (the Triton interpreter has no bf16: tl.dot "
                "on bf16 is wrong there); use dtype float16 or float32"
            )

    def prepare_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Weights are used as they are (``[N, K]`` row-major); checked at load time so that an
        unsupported dtype fails before the first step."""
        self.check_dtype(weight.dtype)
        return weight

    def quantized_dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(d for d in (torch.float16, torch.bfloat16, torch.float32) if self.supports_dtype(d))

    def prepare_quant_weight(self, weight: QuantWeight, int8_activations: bool) -> QuantWeight:
        """Kept as it is: ``quant_gemm`` dequantizes in registers and its activations stay in their
        dtype (weight-only W4A16 / W8A16, whatever ``int8_activations`` says)."""
        return weight.to(self.device)

    # ---- planning ----------------------------------------------------------------------------
    def prepare(self, meta: AttnMetadata, num_heads: int, num_kv_heads: int, head_dim: int | None = None) -> None:
        from portable_xy.triton_kernels.meta_attention import plan_attention

        meta.plan = plan_attention(meta, num_heads, num_kv_heads, self.profile, head_dim)

    def plan_decode(self, batch_size, max_seq_len, num_heads, num_kv_heads):
        from portable_xy.triton_kernels.meta_attention import plan_decode_attention

        return plan_decode_attention(batch_size, max_seq_len, num_heads, num_kv_heads, self.profile, self.device)

    # ---- ops ---------------------------------------------------------------------------------
    def linear(self, x, weight, bias=None):
        self.check_dtype(x.dtype)
        if isinstance(weight, QuantWeight):
            return self.k.quant_gemm.quant_linear(x, weight, bias, self.profile)
        return self.k.smooth_gemm.smooth_gemm(x, weight, bias, self.profile)

    def rms_norm(self, x, weight, eps, residual=None):
        self.check_dtype(x.dtype)
        return self.k.rms_norm.rms_norm(x, weight, eps, residual, self.profile)

    def rope(self, q, k, positions, cos_sin):
        self.check_dtype(q.dtype)
        return self.k.rope.rope(q, k, positions, cos_sin, self.profile)

    def silu_and_mul(self, x):
        self.check_dtype(x.dtype)
        return self.k.activation.silu_and_mul(x, self.profile)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        self.check_dtype(k_cache.dtype)
        self.k.kv_cache.store_kv(k, v, k_cache, v_cache, slot_mapping, self.profile)

    def attention(self, q, k_cache, v_cache, meta, scale):
        self.check_dtype(q.dtype)
        from portable_xy.triton_kernels.meta_attention import meta_attention, plan_attention

        plan = meta.plan
        if plan is None:  # prepare() was not called for this step
            plan = meta.plan = plan_attention(meta, q.shape[1], k_cache.shape[2], self.profile, q.shape[2])
        return meta_attention(q, k_cache, v_cache, meta, scale, plan)

    # ---- mixture of experts ------------------------------------------------------------------
    def prepare_experts(self, weights):
        """Stacked ``[E, N, K]`` (or one stacked QuantWeight) for the fused-MoE kernel; a list
        that does not stack (mixed kinds, dtypes, shapes or quantization types) stays a list and
        runs the base class's per-expert loop."""
        from portable_xy.triton_kernels.moe_plan import stack_experts

        stacked = stack_experts(list(weights))
        return super().prepare_experts(weights) if stacked is None else stacked

    def moe_route(self, router_logits, top_k, renormalize):
        return self.k.fused_moe.moe_route(router_logits, top_k, renormalize, self.profile)

    def fused_moe(self, x, w13, w2, topk_weights, topk_ids, expert_start=0):
        """The fused-MoE kernel when both weights are stacked and of one kind (plain or
        quantized); otherwise the base class's per-expert loop on the experts' own weights."""
        if isinstance(w13, list) or isinstance(w2, list) or isinstance(w13, QuantWeight) != isinstance(w2, QuantWeight):
            from portable_xy.triton_kernels.moe_plan import unstack_experts

            w13, w2 = unstack_experts(w13), unstack_experts(w2)
            return super().fused_moe(x, w13, w2, topk_weights, topk_ids, expert_start)
        self.check_dtype(x.dtype)
        return self.k.fused_moe.fused_moe(x, w13, w2, topk_weights, topk_ids, self.profile, expert_start)

    def sample(self, logits, temperature, top_k, top_p, min_p, uniform):
        return self.k.sampling.sample(logits, temperature, top_k, top_p, min_p, uniform, self.profile)

    def synchronize(self) -> None:
        self.platform.synchronize(self.device)

    def mem_get_info(self) -> tuple[int, int] | None:
        return self.platform.mem_get_info(self.device)


# ------------------------------------------------------------------------------------------------
# construction
# ------------------------------------------------------------------------------------------------


def make_triton_backend(name: str) -> TritonBackend:
    """Build the Triton backend of platform ``name`` (see the module doc): the device is checked
    first, then the kernels are imported in the matching Triton mode, then the device's profile is
    resolved."""
    platform = get_platform(name)
    if not platform.runs_triton:
        triton_names = sorted(n for n, p in PLATFORMS.items() if p.runs_triton)
        raise ValueError(f"not a Triton backend: {name!r} (choose from {triton_names})")
    platform.require()
    kernels = _load_kernels(interpret=platform.triton_interpreted)
    platform.check_triton()
    info = platform.detect()
    return TritonBackend(name, info.device, info.profile(), kernels)


__all__ = ["TritonBackend", "make_triton_backend"]
