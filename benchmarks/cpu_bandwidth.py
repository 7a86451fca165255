"""Where a CPU decode step's time goes: memory bandwidth of the GEMM paths the `cpu` backend can
take, on the linear layers of a model, with weights that do not stay in cache between calls.

    python benchmarks/cpu_bandwidth.py [--model PATH] [--rows 1 32] [--rounds 7]

For each row count M it times one pass over every decoder layer's QKV, O, gate-up and down
weights (the shapes of ``--model``, default SmolLM2-135M; random values) with:
  - ``bf16 AMX``: the backend's AMX kernel on weights packed as tiles (its path for every M on
    a host with AMX; see ``backends/cpu_native.py``);
  - ``bf16 oneDNN packed``: oneDNN on weights pre-packed at load (the backend's path for M >= 2
    on other hosts);
  - ``bf16 C GEMV``: the C GEMV on plain weights (the path for M = 1 on other hosts);
  - ``bf16 mv``: ATen's native bf16 matrix-vector kernel (M = 1 only);
  - ``fp32``: ``F.linear`` on fp32 weights (MKL), twice the bytes;
and a plain streaming read (``sum``) of the same number of bytes, the machine's practical ceiling.
Paths run interleaved for ``--rounds`` rounds; medians are printed with the bandwidth they
imply (weight bytes / time). Decode on CPU is bound by these numbers: every step reads every
weight once, whatever M is.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from portable_xy.backends import cpu_native
from portable_xy.engine_args import add_engine_args
from portable_xy.models.loader import load_model_config, resolve_model_path
from portable_xy.tools.bench.shapes import layer_shapes


def onednn(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)  # --model: the shapes (the weights are random)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    c = load_model_config(resolve_model_path(args.model))  # the shapes; weights are random
    shapes = layer_shapes(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) * c.num_layers
    bf16 = [torch.randn(n, k).to(torch.bfloat16) for n, k in shapes]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in bf16]
    nbytes = sum(w.numel() for w in bf16) * 2
    flat = torch.ones(nbytes // 4)
    print(f"{c.num_layers} layers, {len(shapes)} GEMMs, {nbytes / 2**20:.0f} MiB of bf16 weights, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for m in args.rows:
        report(m, bf16, packed, nbytes, flat, args.rounds)


def report(m: int, bf16: list[torch.Tensor], packed: list, nbytes: int, flat: torch.Tensor, rounds: int) -> None:
    xs = {w.shape[1]: torch.randn(m, w.shape[1]).to(torch.bfloat16) for w in bf16}
    xf = {k: x.float() for k, x in xs.items()}
    fp32 = [w.float() for w in bf16]
    paths: dict[str, tuple[Callable[[], object], int]] = {
        "bf16 oneDNN packed": (lambda: [onednn(xs[w.shape[1]], p) for w, p in zip(bf16, packed)], nbytes),
        "fp32 F.linear": (lambda: [F.linear(xf[w.shape[1]], w) for w in fp32], 2 * nbytes),
        "stream read (sum)": (lambda: flat.sum(), nbytes),
    }
    lib = cpu_native.load()
    if lib is not None:
        paths["bf16 C GEMV"] = (lambda: [cpu_native.gemv(lib, xs[w.shape[1]], w, None) for w in bf16], nbytes)
    if lib is not None and cpu_native.has_amx(lib):
        amx = [(xs[w.shape[1]], cpu_native.pack_amx(w), w.shape[0]) for w in bf16]
        paths["bf16 AMX"] = (lambda: [cpu_native.gemm_amx(lib, x, t, n, None) for x, t, n in amx], nbytes)
    if m == 1:
        paths["bf16 mv"] = (lambda: [torch.mv(w, xs[w.shape[1]][0]) for w in bf16], nbytes)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for fn, _ in paths.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, (fn, _) in paths.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"\nM = {m}: median of {rounds} interleaved rounds")
    for name, (_, size) in paths.items():
        t = statistics.median(times[name])
        print(f"  {name:<18} {t * 1e3:8.1f} ms  {size / t / 1e9:6.1f} GB/s")


if __name__ == "__main__":
    main()
