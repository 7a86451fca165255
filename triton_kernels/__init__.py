"""Meta-kernels written once in Triton (Meta-Attention, SmoothGEMM and support kernels).

Each kernel module names its torch reference in ``portable_xy.backends.cpu``.
"""
