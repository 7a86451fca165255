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

from .config import ModelConfig


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
                from .loader import ModelLoadError

                raise ModelLoadError(f"weight file {str(f)!r} is corrupt or truncated: {e}") from None
            self._files[f] = handle
            for key in handle.keys():
                self._where[key] = handle

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        handle = self._where[name]
        if dim is None:
            return handle.get_tensor(name)
        sl = handle.get_slice(name)
        index = (slice(None),) * dim + (slice(start, stop),)
        return sl[index]


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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._names[name][0].shape)

    def get(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        from .loader import ModelLoadError

        try:
            return self._get(name, dim, start, stop)
        except NotImplementedError as e:
            raise ModelLoadError(f"GGUF file {str(self._path)!r}: {e}") from None
        except (ValueError, IndexError) as e:
            raise ModelLoadError(f"GGUF file {str(self._path)!r} is corrupt or truncated: {e}") from None

    def _get(self, name: str, dim: int | None, start: int, stop: int | None) -> torch.Tensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        from .loader import _unpermute

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
            w = _unpermute(w, heads)
        return torch.from_numpy(np.array(w, dtype=np.float32))  # owned, writable copy
