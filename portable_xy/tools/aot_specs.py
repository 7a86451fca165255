"""Compile specs of every Triton kernel for ``portable-xy kernels aot-report`` (``tools/aot.py``).

One function per kernel module, ``<module>(profile) -> [spec]``, listed in :data:`KERNEL_SPECS`.
A spec is a dict::

    name                 str   kernel/config label shown in the report
    fn                   the @triton.jit function
    signature            {arg: "*fp16" | "i32" | "fp32" | "constexpr" ...}
    constexprs           {arg: value}
    num_warps, num_stages
    expect_tensor_cores  bool (or "mma": any tensor-core MMA is enough)
    divisible_by_16      optional list of integer args assumed multiples of 16 (pointers always are)
    options              optional extra compile options

The specs live here, not in the kernel files, so that the kernel-source hash a tuned profile is
keyed on changes only when a kernel does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def half_dtypes(profile) -> list[torch.dtype]:
    """fp16, and bf16 where the profile supports it."""
    bf16 = (profile.data.get("supports") or {}).get("bf16", True)
    return [torch.float16, torch.bfloat16] if bf16 else [torch.float16]


def _half_types(profile) -> list[str]:
    return [_TY[dt] for dt in half_dtypes(profile)]


def smooth_gemm(profile) -> list[dict]:
    """One spec per (menu tile, half-precision dtype): generic M, no bias, K a multiple of BLOCK_K
    and N, K, row strides multiples of 16 (model sizes are), unit inner strides (which the JIT
    specialises to constexpr 1 at run time)."""
    from ..triton_kernels.gemm_plan import menu
    from ..triton_kernels.smooth_gemm import smooth_gemm_kernel

    specs = []
    persistent = bool(profile.gemm.get("persistent", False))
    for ty in _half_types(profile):
        for t in menu(profile):
            cx = dict(BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K,
                      GROUP_M=int(profile.gemm.get("group_m", 1)), HAS_BIAS=False, EVEN_K=True,
                      FP32_IEEE=False, PERSISTENT=persistent, stride_xk=1, stride_wk=1, stride_yn=1)  # fmt: skip
            sig = {"x_ptr": f"*{ty}", "w_ptr": f"*{ty}", "b_ptr": f"*{ty}", "y_ptr": f"*{ty}"}
            sig.update({k: "i32" for k in ("M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "num_programs")})
            sig.update({k: "constexpr" for k in cx})
            specs.append(dict(
                name=f"smooth_gemm_{ty}_{t.name}", fn=smooth_gemm_kernel, signature=sig, constexprs=cx,
                num_warps=t.num_warps, num_stages=t.num_stages, expect_tensor_cores=True,
                divisible_by_16=["N", "K", "stride_xm", "stride_wn", "stride_ym"],
                options={k: v for k, v in t.options if k not in ("num_warps", "num_stages")},
            ))  # fmt: skip
    return specs


def quant_gemm(profile) -> list[dict]:
    """The weight-only quantized GEMM: one spec per (``quant_gemm.tiles`` menu tile, 4 / 8 bits,
    half-precision dtype) for the tiled variant (all of K, like a SmoothGEMM tile); the small-M
    tile (``quant_gemm.small_m.tile``) as the split-K variant writing fp32 partials, per bits and
    dtype; and the split-K reduce kernel per dtype. Generic M, no bias, K a multiple of BLOCK_K;
    N, K, the x / y / qs row strides and ``k_per_split`` multiples of 16 (model sizes are; the
    scale row stride K / 32 need not be), unit inner strides."""
    from ..triton_kernels.gemm_plan import GemmTile
    from ..triton_kernels.quant_gemm import quant_gemm_kernel, quant_section, split_k_reduce_kernel, tiled_profile

    q = quant_section(profile)
    if not q.get("tiles"):
        return []
    view = tiled_profile(profile)
    persistent = bool(view.gemm.get("persistent", False))
    variants = [(GemmTile.from_dict(t), False) for t in q["tiles"]]
    small = q.get("small_m") or {}
    if small.get("tile"):
        variants.append((GemmTile.from_dict(small["tile"]), True))
    ints = ("M", "N", "K", "stride_xm", "stride_qn", "stride_dn", "stride_mn", "stride_ym", "k_per_split",
            "num_splits", "num_programs")  # fmt: skip
    specs = []
    for ty in _half_types(profile):
        for bits in (4, 8):
            for t, split in variants:
                cx = dict(BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K,
                          GROUP_M=int(view.gemm.get("group_m", 1)), BITS=bits, HAS_BIAS=False, EVEN_K=True,
                          FP32_IEEE=False, PERSISTENT=persistent, SPLIT=split, stride_xk=1, stride_yn=1)  # fmt: skip
                sig = {"x_ptr": f"*{ty}", "q_ptr": "*u8", "d_ptr": "*fp16", "m_ptr": "*fp16", "b_ptr": f"*{ty}",
                       "y_ptr": "*fp32" if split else f"*{ty}"}  # fmt: skip
                sig.update({k: "i32" for k in ints})
                sig.update({k: "constexpr" for k in cx})
                specs.append(dict(
                    name=f"quant_gemm_w{bits}_{ty}_{t.name}{'_splitk' if split else ''}", fn=quant_gemm_kernel,
                    signature=sig, constexprs=cx, num_warps=t.num_warps, num_stages=t.num_stages,
                    expect_tensor_cores=True,
                    divisible_by_16=["N", "K", "stride_xm", "stride_qn", "stride_ym", "k_per_split"],
                    options={k: v for k, v in t.options if k not in ("num_warps", "num_stages")},
                ))  # fmt: skip
        s = profile.data.get("support") or {}
        sig = {"ws_ptr": "*fp32", "b_ptr": f"*{ty}", "y_ptr": f"*{ty}"}
        sig.update({k: "i32" for k in ("M", "N", "num_splits", "split_stride", "stride_ym", "num_programs")})
        specs.append(dict(
            name=f"split_k_reduce_{ty}", fn=split_k_reduce_kernel, signature=sig,
            constexprs=dict(BLOCK_N=1024, HAS_BIAS=True, stride_yn=1), num_warps=int(s.get("num_warps", 4)),
            num_stages=1, expect_tensor_cores=False, divisible_by_16=["N", "split_stride", "stride_ym"],
        ))  # fmt: skip
    return specs


def fused_moe(profile) -> list[dict]:
    """The fused-MoE kernels: the grouped GEMM per (``gemm.tiles`` menu tile, half-precision dtype,
    variant: ``gate_up`` = gathered x rows with the SwiGLU epilogue, ``down`` = routing weights
    and scattered rows); the quantized grouped GEMM per (``quant_gemm.tiles`` tile, 4 / 8 bits,
    dtype, variant); the combine (k = 8, ``support.block_i`` columns) and the routing kernel
    (128 experts top-8 and 8 experts top-2, renormalised) per dtype. Generic task counts; N, K,
    row and expert strides multiples of 16, unit inner strides."""
    from ..triton_kernels.fused_moe import (
        combine_blocks,
        moe_combine_kernel,
        moe_gemm_kernel,
        moe_quant_gemm_kernel,
        moe_route_kernel,
        route_blocks,
    )
    from ..triton_kernels.gemm_plan import GemmTile, menu
    from ..triton_kernels.quant_gemm import quant_section

    persistent = bool(profile.gemm.get("persistent", False))
    group_m = int(profile.gemm.get("group_m", 1))
    q = quant_section(profile)
    quant_tiles = [GemmTile.from_dict(t) for t in q.get("tiles") or []]
    s = profile.data.get("support") or {}
    warps = int(s.get("num_warps", 4))
    idx = {"ids_ptr": "*i32", "tasks_ptr": "*i32", "rw_ptr": "*fp32"}
    specs = []

    def gemm_spec(name, fn, sig, t, cx, div):
        sig = {**sig, **{k: "constexpr" for k in cx}}
        return dict(
            name=name, fn=fn, signature=sig, constexprs=cx, num_warps=t.num_warps, num_stages=t.num_stages,
            expect_tensor_cores=True, divisible_by_16=div,
            options={k: v for k, v in t.options if k not in ("num_warps", "num_stages")},
        )  # fmt: skip

    for ty in _half_types(profile):
        for gate_up in (True, False):
            variant = "gate_up" if gate_up else "down"
            base = dict(TOP_K=8, GROUP_M=group_m, GATE_UP=gate_up, EVEN_K=True, FP32_IEEE=False,
                        PERSISTENT=persistent, stride_ak=1, stride_yn=1)  # fmt: skip
            for t in menu(profile):
                cx = dict(BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K, stride_wk=1, **base)
                sig = {"a_ptr": f"*{ty}", "w_ptr": f"*{ty}", "y_ptr": f"*{ty}", **idx}
                sig.update({k: "i32" for k in ("num_tasks", "N", "K", "stride_am", "stride_we", "stride_wn",
                                               "stride_ym", "num_programs")})  # fmt: skip
                specs.append(gemm_spec(f"moe_gemm_{variant}_{ty}_{t.name}", moe_gemm_kernel, sig, t, cx,
                                       ["N", "K", "stride_am", "stride_we", "stride_wn", "stride_ym"]))  # fmt: skip
            for bits in (4, 8):
                for t in quant_tiles:
                    cx = dict(BLOCK_M=t.BLOCK_M, BLOCK_N=t.BLOCK_N, BLOCK_K=t.BLOCK_K, QUANT_BITS=bits, **base)
                    sig = {"a_ptr": f"*{ty}", "q_ptr": "*u8", "d_ptr": "*fp16", "m_ptr": "*fp16", "y_ptr": f"*{ty}",
                           **idx}  # fmt: skip
                    sig.update({k: "i32" for k in ("num_tasks", "N", "K", "stride_am", "stride_qe", "stride_qn",
                                                   "stride_de", "stride_dn", "stride_me", "stride_mn", "stride_ym",
                                                   "num_programs")})  # fmt: skip
                    div = ["N", "K", "stride_am", "stride_qe", "stride_qn", "stride_ym"]
                    specs.append(gemm_spec(f"moe_quant_gemm_w{bits}_{variant}_{ty}_{t.name}", moe_quant_gemm_kernel,
                                           sig, t, cx, div))  # fmt: skip
        sig = {"y_ptr": f"*{ty}", "ids_ptr": "*i64", "out_ptr": f"*{ty}"}
        sig.update({k: "i32" for k in ("T", "H", "expert_lo", "expert_hi", "stride_ym", "stride_it", "stride_ot",
                                       "num_programs")})  # fmt: skip
        cx = dict(TOP_K=8, **combine_blocks(8192, profile))
        sig.update({k: "constexpr" for k in cx})
        specs.append(dict(name=f"moe_combine_{ty}", fn=moe_combine_kernel, signature=sig, constexprs=cx,
                          num_warps=warps, num_stages=1, expect_tensor_cores=False,
                          divisible_by_16=["H", "stride_ym", "stride_ot"]))  # fmt: skip
        for experts, k in ((128, 8), (8, 2)):
            cx = dict(TOP_K=k, RENORMALIZE=True, stride_le=1, **route_blocks(experts, k))
            sig = {"logits_ptr": f"*{ty}", "w_ptr": "*fp32", "ids_ptr": "*i64", "T": "i32", "E": "i32",
                   "stride_lt": "i32", "num_programs": "i32", **{c: "constexpr" for c in cx}}  # fmt: skip
            specs.append(dict(name=f"moe_route_{ty}_e{experts}_k{k}", fn=moe_route_kernel, signature=sig,
                              constexprs=cx, num_warps=warps, num_stages=1, expect_tensor_cores=False,
                              divisible_by_16=["stride_lt"]))  # fmt: skip
    return specs


_ATT_PTRS = ("q_ptr", "k_ptr", "v_ptr", "o_ptr")
_ATT_I32_PTRS = ("units_ptr", "segments_ptr", "q_start_ptr", "seq_lens_ptr", "tables_ptr", "tree_off_ptr")
_ATT_STRIDES = ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_kb", "stride_ks", "stride_kh",
                "stride_vb", "stride_vs", "stride_vh")  # fmt: skip


def meta_attention(profile) -> list[dict]:
    """The launch variants the profile produces, per dtype (fp16, bf16 where supported) and head
    dim (64, 128), GQA group 4: ``full`` (every menu tile: a mixed step with a long prefill),
    ``tree`` (the tree-mask variant over the tree menu), ``decode_split`` (the smallest tile alone,
    writing split-KV partials), plus the split-KV reduce kernel."""
    from ..triton_kernels.meta_attention import (
        attention_launch_options,
        meta_attention_kernel,
        split_kv_reduce_kernel,
        tree_max_q_tile,
    )
    from ..triton_kernels.task_table import launch_tiles

    att = profile.attention
    menu = sorted(int(t) for t in att["q_tiles"])
    specs = []
    for ty in _half_types(profile):
        for head_dim in (64, 128):
            tree_menu = [t for t in menu if t <= tree_max_q_tile(att, head_dim)] or menu[:1]
            variants = [("full", menu, False, False), ("tree", tree_menu, True, False),
                        ("decode_split", menu[:1], False, True)]  # fmt: skip
            for label, tiles, tree, split in variants:
                m = launch_tiles(tiles)
                cx = dict(GROUP=4, HEAD_DIM=head_dim, M_TILE0=m[0], M_TILE1=m[1], M_TILE2=m[2], M_TILE3=m[3],
                          BLOCK_N=int(att["kv_tile"]), KV_BLOCK=int(profile.kv_block_size), HAS_TREE=tree,
                          SPLIT=split, FP32_IEEE=False)  # fmt: skip
                sig = {p: f"*{ty}" for p in _ATT_PTRS}
                sig.update({p: "*i32" for p in _ATT_I32_PTRS})
                sig.update({"tree_ptr": "*i8", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32"})
                sig.update({k: "i32" for k in (*_ATT_STRIDES, "stride_bt", "num_q_heads", "num_splits")})
                sig["scale"] = "fp32"
                opts = attention_launch_options(att, m[-1], head_dim)
                specs.append(dict(
                    name=f"meta_attention_{ty}_d{head_dim}_{label}", fn=meta_attention_kernel, signature=sig,
                    constexprs=cx, num_warps=opts.pop("num_warps"), num_stages=opts.pop("num_stages"),
                    expect_tensor_cores=True, divisible_by_16=list(_ATT_STRIDES), options=opts,
                ))  # fmt: skip
        sig = {"part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "o_ptr": f"*{ty}"}
        ints = ("n_rows", "num_q_heads", "num_splits", "stride_ot", "stride_oh", "num_programs")
        sig.update({k: "i32" for k in ints})
        specs.append(dict(name=f"split_kv_reduce_{ty}", fn=split_kv_reduce_kernel, signature=sig,
                          constexprs=dict(SPLITS_P2=8, HEAD_DIM=128), num_warps=4, num_stages=1,
                          expect_tensor_cores=False, divisible_by_16=["stride_ot", "stride_oh"]))  # fmt: skip
    return specs


def rms_norm(profile) -> list[dict]:
    """fp16/bf16, hidden size 4096 in chunks of ``support.block_d``, with and without residual."""
    from ..triton_kernels.rms_norm import rms_norm_kernel

    s = profile.data.get("support") or {}
    block_d = min(4096, int(s.get("block_d", 4096)))
    specs = []
    for ty in _half_types(profile):
        for has_res in (False, True):
            sig = {"x_ptr": f"*{ty}", "res_ptr": f"*{ty}", "w_ptr": f"*{ty}", "y_ptr": f"*{ty}",
                   "r_out_ptr": f"*{ty}", "n_rows": "i32", "H": "i32", "D": "i32", "stride_xt": "i32",
                   "stride_xh": "i32", "stride_rt": "i32", "stride_rh": "i32", "eps": "fp32",
                   "num_programs": "i32", "BLOCK_D": "constexpr", "HAS_RESIDUAL": "constexpr"}  # fmt: skip
            specs.append(dict(
                name=f"rms_norm_{ty}{'_res' if has_res else ''}", fn=rms_norm_kernel, signature=sig,
                constexprs={"BLOCK_D": block_d, "HAS_RESIDUAL": has_res}, num_warps=int(s.get("num_warps", 4)),
                num_stages=1, expect_tensor_cores=False, divisible_by_16=["D", "stride_xt", "stride_rt"],
            ))  # fmt: skip
    return specs


def rope(profile) -> list[dict]:
    """fp16/bf16, head_dim 128, 32 q heads and 8 kv heads (Llama-3-8B-like)."""
    from ..triton_kernels.rope import block_h, rope_kernel

    s = profile.data.get("support") or {}
    specs = []
    for ty in _half_types(profile):
        sig = {"q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "qo_ptr": f"*{ty}", "ko_ptr": f"*{ty}", "pos_ptr": "*i64",
               "cs_ptr": "*fp32", "T": "i32", "HQ": "i32", "HK": "i32", "stride_qt": "i32", "stride_qh": "i32",
               "stride_kt": "i32", "stride_kh": "i32", "stride_cs": "i32", "num_programs": "i32"}  # fmt: skip
        cx = {"HALF": 64, "BLOCK_HALF": 64, "BLOCK_HQ": block_h(32, profile), "BLOCK_HK": block_h(8, profile)}
        sig.update({k: "constexpr" for k in cx})
        specs.append(dict(
            name=f"rope_{ty}_d128", fn=rope_kernel, signature=sig, constexprs=cx,
            num_warps=int(s.get("num_warps", 4)), num_stages=1, expect_tensor_cores=False,
            divisible_by_16=["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_cs"],
        ))  # fmt: skip
    return specs


def activation(profile) -> list[dict]:
    """SiLU-and-mul, fp16/bf16, ``support.block_i`` columns per program."""
    from ..triton_kernels.activation import silu_and_mul_kernel

    s = profile.data.get("support") or {}
    specs = []
    for ty in _half_types(profile):
        sig = {"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "n_rows": "i32", "n_cols": "i32", "stride_xm": "i32",
               "stride_ym": "i32", "num_programs": "i32", "BLOCK_I": "constexpr"}  # fmt: skip
        specs.append(dict(
            name=f"silu_and_mul_{ty}", fn=silu_and_mul_kernel, signature=sig,
            constexprs={"BLOCK_I": int(s.get("block_i", 1024))}, num_warps=int(s.get("num_warps", 4)),
            num_stages=1, expect_tensor_cores=False, divisible_by_16=["n_cols", "stride_xm", "stride_ym"],
        ))  # fmt: skip
    return specs


def kv_cache(profile) -> list[dict]:
    """KV store, fp16/bf16, 8 KV heads of 128."""
    from ..triton_kernels.kv_cache import store_kv_kernel

    s = profile.data.get("support") or {}
    specs = []
    for ty in _half_types(profile):
        sig = {"k_ptr": f"*{ty}", "v_ptr": f"*{ty}", "kc_ptr": f"*{ty}", "vc_ptr": f"*{ty}", "slot_ptr": "*i64",
               "T": "i32", "H": "i32", "D": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32",
               "stride_vh": "i32", "num_programs": "i32", "BLOCK_H": "constexpr", "BLOCK_D": "constexpr"}  # fmt: skip
        specs.append(dict(
            name=f"store_kv_{ty}", fn=store_kv_kernel, signature=sig, constexprs={"BLOCK_H": 8, "BLOCK_D": 128},
            num_warps=int(s.get("num_warps", 4)), num_stages=1, expect_tensor_cores=False,
            divisible_by_16=["D", "stride_kt", "stride_kh", "stride_vt", "stride_vh"],
        ))  # fmt: skip
    return specs


def sampling(profile) -> list[dict]:
    """The sampling kernel over fp32 logits, ``sampling.block_v`` vocabulary chunks."""
    from ..triton_kernels.sampling import sample_kernel

    s = profile.data.get("sampling") or {}
    sig = {"logits_ptr": "*fp32", "temp_ptr": "*fp32", "topk_ptr": "*i32", "topp_ptr": "*fp32", "minp_ptr": "*fp32",
           "u_ptr": "*fp32", "out_ptr": "*i64", "N": "i32", "V": "i32", "stride_l": "i32", "num_programs": "i32",
           "BLOCK_V": "constexpr"}  # fmt: skip
    return [
        dict(
            name="sample", fn=sample_kernel, signature=sig, constexprs={"BLOCK_V": int(s.get("block_v", 4096))},
            num_warps=int(s.get("num_warps", 4)), num_stages=1, expect_tensor_cores=False,
            divisible_by_16=["V", "stride_l"],
        )
    ]  # fmt: skip


# kernel module (portable_xy.triton_kernels.<name>) -> its specs
KERNEL_SPECS: dict[str, Callable[[object], list[dict]]] = {
    "activation": activation,
    "fused_moe": fused_moe,
    "kv_cache": kv_cache,
    "meta_attention": meta_attention,
    "quant_gemm": quant_gemm,
    "rms_norm": rms_norm,
    "rope": rope,
    "sampling": sampling,
    "smooth_gemm": smooth_gemm,
}
