"""Meta-kernels written once in Triton: Meta-Attention (``meta_attention.py``, tiles dealt to cores
by ``task_table.py``), SmoothGEMM (``smooth_gemm.py``, tile plans in ``gemm_plan.py``), its
weight-only quantized form (``quant_gemm.py``: W4A16 / W8A16, tiled and split-K), the fused
mixture-of-experts kernel (``fused_moe.py``: routing and grouped GEMMs over per-expert tile plans
from ``moe_plan.py``) and the support kernels (``rms_norm.py``, ``rope.py``, ``activation.py``,
``kv_cache.py``, ``sampling.py``), with launch helpers shared by several kernels in ``launch.py``.

Each kernel module names its torch definition in ``portable_xy.backends.reference``.
"""
