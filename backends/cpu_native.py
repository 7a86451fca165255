"""Build and call ``cpu_native.c``: the cpu backend's bf16 fast path in C.

The C file is compiled once per source, compiler and host CPU with the system C compiler
(``$CC``, else ``cc``) into ``$PORTABLE_XY_CACHE`` (default ``~/.cache/portable_xy``) and loaded
with ctypes: no torch headers, about a second to build. Without a compiler, or with
``PORTABLE_XY_NATIVE=0``, :func:`load` returns ``None`` and the cpu backend stays on torch ops.
Each wrapper takes contiguous bf16 tensors (the callers check) and returns new tensors unless it
says "in place".
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .. import envs
from .quant import QuantWeight

SOURCE = Path(__file__).with_name("cpu_native.c")
FLAGS = ["-O3", "-ffp-contract=off", "-std=c11", "-shared", "-fPIC"]
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "px_rms_norm_bf16": [_P, _P, _P, _P, _P, _I, _I, _F],
    "px_rope_bf16": [_P, _I, _I, _I, _I, _P, _I, _P],
    "px_gemv_bf16": [_P, _P, _P, _P, _I, _I, _I],
    "px_silu_and_mul_bf16": [_P, _P, _I, _I],
    "px_store_kv_bf16": [_P, _I, _P, _I, _P, _P, _P, _I, _I, _I],
    "px_paged_attention_bf16": [_P, _I, _P, _P, _P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F],
    "px_set_num_threads": [_I],
    "px_qgemm_bf16": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I],
    "px_dequant_amx_tiles": [_P, _P, _P, _I, _I, _I, _I, _P],
}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def build(march: str = "native", cache_dir: Path | None = None) -> Path:
    """Compile ``cpu_native.c`` for ``-march=<march>`` (if not already cached) and return the shared
    library's path. OpenMP (the attention kernel's threads) is used where the compiler has it.
    Raises ``RuntimeError`` with the compiler's message when it cannot build."""
    cc = shutil.which(envs.c_compiler())
    if cc is None:
        raise RuntimeError(f"no C compiler: {envs.c_compiler()!r} is not on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    flags = [*FLAGS, f"-march={march}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *flags, _cpu_flags()]).encode()).hexdigest()
    cache_dir = cache_dir or envs.cache_root()
    lib = cache_dir / f"cpu_native-{key[:16]}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)  # built aside, renamed: safe when racing
    os.close(fd)
    try:
        for omp in (["-fopenmp"], []):
            run = subprocess.run([cc, *flags, *omp, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
            if run.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}:\n{run.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def open_library(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' signatures."""
    lib = ctypes.CDLL(str(path))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    for name in ("px_paged_attention_bf16", "px_rope_bf16", "px_store_kv_bf16", "px_qgemm_bf16"):
        getattr(lib, name).restype = ctypes.c_int
    lib.px_amx_available.argtypes, lib.px_amx_available.restype = [], ctypes.c_int
    lib.px_quant_kernel.argtypes, lib.px_quant_kernel.restype = [], ctypes.c_char_p
    if hasattr(lib, "px_gemm_amx_bf16"):  # only in builds for a CPU with AMX
        lib.px_gemm_amx_bf16.argtypes, lib.px_gemm_amx_bf16.restype = [_P, _P, _P, _P, _I, _I, _I], ctypes.c_int
    return lib


def has_amx(lib: ctypes.CDLL) -> bool:
    """Whether ``lib`` has the AMX GEMM and the OS lets this process use AMX tiles
    (``PORTABLE_XY_AMX=0`` says no, e.g. to compare with the oneDNN path)."""
    return envs.amx_enabled() and bool(lib.px_amx_available())


def set_num_threads(n: int) -> None:
    """Threads of torch's CPU ops and of this library's kernels (it has its own OpenMP runtime, which
    ``torch.set_num_threads`` does not reach)."""
    torch.set_num_threads(n)
    lib = load()
    if lib is not None:
        lib.px_set_num_threads(n)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The loaded library, or ``None`` (with one warning saying why) when it cannot be built."""
    if not envs.native_enabled():
        return None
    try:
        return open_library(build())
    except (OSError, RuntimeError) as e:
        warnings.warn(f"cpu backend: fused C ops unavailable, using torch ops ({e})", RuntimeWarning, stacklevel=2)
        return None


def rms_norm(
    lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`reference.rms_norm_ref` for bf16 ``x`` ``[T, D]`` and weight, fp32 residual (or none)."""
    out = torch.empty_like(x)
    res_out = None if residual is None else torch.empty_like(residual)
    lib.px_rms_norm_bf16(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        None if res_out is None else res_out.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        x.shape[0],
        x.shape[1],
        eps,
    )
    return out, res_out


def rope_(lib: ctypes.CDLL, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate, in place, the bf16 heads ``x`` ``[T, H, D]`` (strides ``(any, D, 1)``);
    ``cos_sin`` fp32 ``[P, D]`` contiguous, ``positions`` int64 ``[T]`` contiguous, as
    :func:`reference.rope_ref`. A position outside ``[0, P)`` raises before anything is rotated."""
    rows, heads, d = x.shape
    status = lib.px_rope_bf16(
        x.data_ptr(), rows, heads, d, x.stride(0), cos_sin.data_ptr(), cos_sin.shape[0], positions.data_ptr()
    )
    if status:
        raise IndexError(f"rope: a position is outside the cos/sin table of {cos_sin.shape[0]} rows")


def gemv(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for a few bf16 rows ``x`` ``[M, K]`` and a plain bf16 ``[N, K]``
    weight (bias bf16 ``[N]``), fp32 accumulation; each row's result does not depend on ``M``."""
    m, k = x.shape
    n = weight.shape[0]
    y = x.new_empty(m, n)
    lib.px_gemv_bf16(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k)
    return y


def pack_amx(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 ``[N, K]`` weight as AMX B tiles for :func:`gemm_amx`: ``[ceil(N/16), ceil(K/32), 16,
    16, 2]``, tile ``(nb, kb)`` row ``r`` holding ``weight[16 nb + j, 32 kb + 2 r + {0, 1}]`` for
    ``j < 16``, zero past N and K."""
    n, k = weight.shape
    nb, kb = -(-n // 16), -(-k // 32)
    padded = weight.new_zeros(nb * 16, kb * 32)
    padded[:n, :k] = weight
    return padded.view(nb, 16, kb, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def gemm_amx(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    tiles: torch.Tensor,
    n: int,
    bias: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for contiguous bf16 ``x`` ``[M, K]`` (M >= 1), the weight packed by
    :func:`pack_amx` (``n`` its rows), bias bf16 ``[n]``: fp32 sums in AMX tiles, rounded once to
    bf16, into ``out`` (contiguous ``[M, n]``) or a new tensor. Each row's result does not depend
    on ``M``. Only for a library where :func:`has_amx` holds."""
    m, k = x.shape
    y = x.new_empty(m, n) if out is None else out
    b = None if bias is None else bias.data_ptr()
    if lib.px_gemm_amx_bf16(x.data_ptr(), tiles.data_ptr(), b, y.data_ptr(), m, n, k):
        raise MemoryError("cpu backend: out of memory for the AMX GEMM's staging buffer")
    return y


def quant_kernel(lib: ctypes.CDLL) -> str:
    """Which quantized GEMM this build of the library runs: ``avx512-vnni``, ``avx2`` or ``plain-c``
    (chosen by the instruction sets of the ``-march`` it was compiled for)."""
    return lib.px_quant_kernel().decode()


def pack_quant(lib: ctypes.CDLL, weight: QuantWeight, int8: bool) -> QuantWeight:
    """``weight`` in the order :func:`qgemm` of this build reads (``int8``: for int8 activations):
    the AVX512-VNNI int8 kernel takes 4-bit rows regrouped per 4 blocks (``cpu_native.c`` says
    how); every other kernel takes ``backends/quant.py``'s order, returned as it is."""
    if not (int8 and weight.bits == 4 and quant_kernel(lib) == "avx512-vnni"):
        return weight
    n, nb = weight.n, weight.k // 32
    halves = weight.qs.view(n, nb, 16)
    q = torch.cat([halves & 0x0F, halves >> 4], dim=-1)  # [n, nb, 32] in element order
    parts = []
    full = nb // 4 * 4
    if full:
        g = q[:, :full].reshape(n, full // 4, 4, 32)
        parts.append(torch.cat([g[:, :, 0] | (g[:, :, 2] << 4), g[:, :, 1] | (g[:, :, 3] << 4)], -1).reshape(n, -1))
    rest = nb - full
    if rest >= 2:
        parts.append((q[:, full] | (q[:, full + 1] << 4)).reshape(n, -1))
    if rest % 2:
        parts.append(halves[:, -1])
    qs = torch.cat(parts, dim=1).contiguous()
    return QuantWeight(weight.qtype, qs, weight.d, weight.m, weight.n, weight.k)


def dequant_amx(
    lib: ctypes.CDLL, weight: QuantWeight, out: torch.Tensor | None = None, int8_packed: bool = False
) -> torch.Tensor:
    """A :class:`QuantWeight` in ``backends/quant.py``'s order (``int8_packed``: as
    :func:`pack_quant` returns it for int8 activations), dequantized to bf16 (as
    ``dequantize_ref(weight, torch.bfloat16)``) into :func:`pack_amx`'s tile layout, written into
    ``out`` (bf16, at least ``ceil(N/16) * K/32 * 512`` elements) or a new tensor."""
    size = -(-weight.n // 16) * (weight.k // 32) * 512
    tiles = torch.empty(size, dtype=torch.bfloat16) if out is None else out[:size]
    lib.px_dequant_amx_tiles(
        weight.qs.data_ptr(), weight.d.data_ptr(), weight.m.data_ptr(), weight.n, weight.k, weight.bits,
        int(int8_packed and quant_kernel(lib) == "avx512-vnni"), tiles.data_ptr(),
    )  # fmt: skip
    return tiles


def qgemm(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    weight: QuantWeight,
    bias: torch.Tensor | None,
    int8: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequantize(weight).T (+ bias)`` for contiguous bf16 ``x`` ``[M, K]`` and a
    :class:`~portable_xy.backends.quant.QuantWeight` packed by :func:`pack_quant` for the same
    ``int8`` (bias bf16 ``[N]``), fp32 sums rounded once
    to bf16, into ``out`` (contiguous ``[M, N]``) or a new tensor. ``int8``: activations quantized
    per 32 values to int8 (llama.cpp's Q8_1), else kept as they are. Each row's result does not
    depend on ``M``."""
    m, k = x.shape
    y = x.new_empty(m, weight.n) if out is None else out
    status = lib.px_qgemm_bf16(
        x.data_ptr(), weight.qs.data_ptr(), weight.d.data_ptr(), weight.m.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), m, weight.n, k, weight.bits, int(int8),
    )  # fmt: skip
    if status:
        raise MemoryError("cpu backend: out of memory for the quantized GEMM's activation buffers")
    return y


def silu_and_mul(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """:func:`reference.silu_and_mul_ref` for a contiguous bf16 ``[T, 2N]`` matrix."""
    rows, n = x.shape[0], x.shape[1] // 2
    out = x.new_empty(rows, n)
    lib.px_silu_and_mul_bf16(x.data_ptr(), out.data_ptr(), rows, n)
    return out


def store_kv(
    lib: ctypes.CDLL,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """:func:`reference.store_kv_ref`: bf16 ``k``/``v`` ``[T, Hkv, D]`` (rows may be strided) into
    the contiguous caches at int64 ``slots`` (-1: skipped). A slot past the cache raises before
    anything is written."""
    width = k.shape[1] * k.shape[2]
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    status = lib.px_store_kv_bf16(
        k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        slots.data_ptr(), k.shape[0], width, num_slots,
    )  # fmt: skip
    if status:
        raise IndexError(f"store_kv: a slot is past the cache's {num_slots} slots")


def paged_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    stages: torch.Tensor,
    scale: float,
) -> None:
    """Attention of short causal stages, written into their rows of ``out`` (other rows untouched).

    ``q`` bf16 ``[T, Hq, D]`` (rows may be strided); ``out`` likewise, contiguous; caches bf16
    ``[blocks, bs, Hkv, D]`` and ``block_tables`` int32 ``[S, max_blocks]``, contiguous;
    ``stages`` int64 ``[4, n]``: each stage's block-table row, first query row, query length and
    KV length."""
    _, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    tables = (block_tables.data_ptr(), block_tables.stride(0), *(stages[i].data_ptr() for i in range(4)))
    status = lib.px_paged_attention_bf16(
        q.data_ptr(), q.stride(0), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        *tables, stages.shape[1], hq, hkv, d, bs, scale,
    )  # fmt: skip
    if status:
        raise MemoryError("cpu backend: out of memory for the attention work buffers")
