"""Weight sources: whole tensors, or one tensor-parallel rank's slice of them, read from a model's
safetensors files or its GGUF file by HF parameter name.

Both formats are memory-mapped, so a slice reads only its own bytes: safetensors through
``safe_open(...).get_slice``; GGUF rows directly, and GGUF columns as whole quantization blocks
(a column range that does not fall on block boundaries dequantizes the full rows first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..backends.quant import QBLOCK, QuantWeight
from .config import ModelConfig


class ModelLoadError(ValueError):
    pass


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its RoPE pairs adjacent dims; HF pairs halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF block types kept quantized: bytes per 32-block and where the scale / min / quants sit in it
_GGUF_QUANT = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}


class WeightSource:
    """``get(name, dim, start, stop)``: the tensor ``name``, or its ``[start, stop)`` range along
    ``dim``, as a torch tensor (GGUF: fp32; safetensors: the stored dtype)."""

    config: ModelConfig

    def names(self) -> set[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def quant_type(self, name: str) -> str | None:
        """The block type (``q4_0``, ``q4_1``, ``q8_0``) ``name`` is stored in and
        :meth:`get_quant` reads, or None (a float or another type)."""
        return None

    def get_quant(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> QuantWeight:
        """``get`` for a tensor :meth:`quant_type` names, without dequantizing: its blocks repacked
        as a :class:`QuantWeight` (a column range must fall on 32-blocks)."""
        raise NotImplementedError(f"tensor {name!r} is not stored quantized")

    def storage_type(self, name: str) -> str:
        """How ``name`` is stored, for notices (e.g. ``Q6_K``, ``F32``, ``torch.bfloat16``)."""
        return "?"


class SafetensorsSource(WeightSource):
    def __init__(self, config: ModelConfig, files: list[Path]) -> None:
        from safetensors import SafetensorError, safe_open

        self.config = config
        self._files = {}
        self._where: dict[str, object] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f"weight file {str(f)!r} is corrupt or truncated: {e}") from None
            self._files[f] = handle
            for key in handle.keys():
                self._where[key] = handle
        # transformers 5's fused expert tensors, one name per expert: name -> (tensor, expert, rows)
        self._experts: dict[str, tuple[str, int, int, int]] = {}
        for key in list(self._where):
            for fused, parts in _FUSED_EXPERTS.items():
                if key.endswith(".experts." + fused):
                    e, n, _ = self._where[key].get_slice(key).get_shape()
                    base = key[: -len(fused)]
                    for i, part in enumerate(parts):
                        rows = n // len(parts)
                        for j in range(e):
                            self._experts[f"{base}{j}.{part}.weight"] = (key, j, i * rows, rows)

    def names(self) -> set[str]:
        return set(self._where) | set(self._experts)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._experts:
            key, _, _, rows = self._experts[name]
            return (rows, self._where[key].get_slice(key).get_shape()[2])
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if name in self._experts:
            key, e, first, rows = self._experts[name]
            stop = (rows if dim == 0 else self.shape(name)[1]) if stop is None else stop
            cut = {None: (slice(first, first + rows),), 0: (slice(first + start, first + stop),),
                   1: (slice(first, first + rows), slice(start, stop))}[dim]  # fmt: skip
            return self._where[key].get_slice(key)[(e, *cut)]
        handle = self._where[name]
        if dim is None:
            return handle.get_tensor(name)
        sl = handle.get_slice(name)
        index = (slice(None),) * dim + (slice(start, stop),)
        return sl[index]


# transformers 5's fused 3D expert tensors and the per-expert [N, K] weights they stack along N
_FUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class GGUFSource(WeightSource):
    """GGUF tensors under HF names; Llama's Q/K rows are un-permuted (per head, so a slice of
    whole heads un-permutes on its own)."""

    def __init__(self, config: ModelConfig, reader, names: dict[str, tuple[object, int | None]], path: Path) -> None:
        self.config = config
        self._path = path
        self._reader = reader  # keeps the memory map open
        self._names = names  # HF name -> (GGUFTensor, heads to un-permute over, or None)

    def names(self) -> set[str]:
        return set(self._names)

    def storage_type(self, name: str) -> str:
        return self._names[name][0].ggml_type.name

    def quant_type(self, name: str) -> str | None:
        t = self._names[name][0]
        return _GGUF_QUANT.get(t.ggml_type.name) if len(t.shape) == 2 else None

    def get_quant(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> QuantWeight:
        qtype = self.quant_type(name)
        if qtype is None:
            raise NotImplementedError(f"tensor {name!r} is stored as {self.storage_type(name)}, not Q4_0/Q4_1/Q8_0")
        t, heads = self._names[name]
        rows, k = t.shape
        raw = np.asarray(t.data).reshape(rows, -1)
        full = t.shape[dim] if dim is not None else 0
        stop = full if stop is None else stop
        if dim == 0:
            raw = raw[start:stop]
            if heads is not None:
                heads = heads * (stop - start) // full
        try:
            w = _repack_gguf(raw, qtype, k)
        except ValueError as e:
            raise ModelLoadError(f"GGUF file {str(self._path)!r} is corrupt or truncated: {e}") from None
        if dim == 1:
            w = w.cols(start, stop)
        if heads is not None:  # the row permutation as an index: un-permute the row numbers
            order = torch.from_numpy(unpermute_qk(np.arange(w.n), heads).copy())
            w = QuantWeight(w.qtype, w.qs[order], w.d[order], w.m[order], w.n, w.k)
        return w

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._names[name][0].shape)

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        try:
            return self._get(name, dim, start, stop)
        except NotImplementedError as e:
            raise ModelLoadError(f"GGUF file {str(self._path)!r}: {e}") from None
        except (ValueError, IndexError) as e:
            raise ModelLoadError(f"GGUF file {str(self._path)!r} is corrupt or truncated: {e}") from None

    def _get(self, name: str, dim: int | None, start: int, stop: int | None) -> torch.Tensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        t, heads = self._names[name]
        data, qtype = t.data, t.ggml_type
        plain = qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        full = t.shape[dim] if dim is not None else 0
        stop = full if stop is None else stop
        post = None  # a column range cut after dequantizing
        if dim == 0:
            data = data[start:stop]
            if heads is not None:
                heads = heads * (stop - start) // full
        elif dim is not None:
            block, type_size = GGML_QUANT_SIZES[qtype]
            if plain:
                data = data[..., start:stop]
            elif start % block == 0 and stop % block == 0:
                data = data[..., start // block * type_size : stop // block * type_size]
            else:
                post = (start, stop)
        w = dequantize(np.ascontiguousarray(data), qtype).astype(np.float32, copy=False)
        if post is not None:
            w = w[..., post[0] : post[1]]
        if heads is not None:
            w = unpermute_qk(w, heads)
        return torch.from_numpy(np.array(w, dtype=np.float32))  # owned, writable copy


def _repack_gguf(raw: np.ndarray, qtype: str, k: int) -> QuantWeight:
    """GGUF blocks (``raw``: uint8 ``[N, K / 32 * block bytes]``) as a :class:`QuantWeight`:
    Q4_0 ``(d, qs[16])``, Q4_1 ``(d, m, qs[16])``, Q8_0 ``(d, qs[32] int8)``, d and m fp16."""
    n = raw.shape[0]
    nb = k // QBLOCK
    per = {"q4_0": 18, "q4_1": 20, "q8_0": 34}[qtype]
    if raw.shape[1] != nb * per:
        raise ValueError(f"{qtype} rows of {raw.shape[1]} bytes for {k} values (expected {nb * per})")
    blocks = np.ascontiguousarray(raw).reshape(n, nb, per)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if qtype == "q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        qs = blocks[..., 4:]
    elif qtype == "q4_0":
        m = (d.astype(np.float32) * -8).astype(np.float16)
        qs = blocks[..., 2:]
    else:
        m = (d.astype(np.float32) * -128).astype(np.float16)
        qs = blocks[..., 2:] ^ np.uint8(0x80)  # int8 w as uint8 w + 128
    if not np.isfinite(m).all() and np.isfinite(d).all():
        raise ValueError(f"{qtype} scales too large for an fp16 min")
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return QuantWeight(qtype, as_t(qs.reshape(n, -1)), as_t(d), as_t(m), n, k)
