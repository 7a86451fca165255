"""A minimal GGUF (v2/v3) reader: metadata values and tensor data views over a memory map.

``gguf.GGUFReader`` builds a numpy view for every element of every metadata array, which takes
~4 s for a 49k-token vocabulary; here string arrays are decoded in one pass and numeric arrays
are single ``frombuffer`` views, so opening SmolLM2's file takes a few tens of milliseconds.
Tensor data stays in the memory map until dequantized (``gguf.quants.dequantize`` reads the
arrays given here). Any malformed or truncated file raises ``ValueError``.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # gguf is imported only when a file is read (the ascend test venv lacks it)
    from gguf.constants import GGMLQuantizationType

MAGIC = b"GGUF"
# metadata value types: struct code of each scalar (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
           7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order (GGUF lists the fastest dimension first)
    data: np.ndarray  # F32/F16: that dtype in ``shape``; other types: uint8 rows of packed blocks


class GGUFFile:
    """``fields`` (key -> int/float/bool/str, list of str, or a numpy array) and ``tensors``."""

    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        if self._bytes(4) != MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        version = self._scalar("I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        n_tensors, n_fields = self._scalar("Q"), self._scalar("Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar("Q") for _ in range(self._scalar("I"))]
            infos.append((name, dims, self._scalar("I"), self._scalar("Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors = [self._tensor(name, dims, t, start + off) for name, dims, t, off in infos]

    def _bytes(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._buf):
            raise ValueError(f"truncated at byte {self._pos} (wanted {n} more)")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def _scalar(self, code: str) -> Any:
        return struct.unpack("<" + code, self._bytes(struct.calcsize(code)))[0]

    def _string(self) -> str:
        return self._bytes(self._scalar("Q")).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype])
        if vtype == 8:
            return self._string()
        if vtype != 9:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = self._scalar("I"), self._scalar("Q")
        if etype in _DTYPES:
            dtype = np.dtype(_DTYPES[etype]).newbyteorder("<")
            return np.frombuffer(self._bytes(count * dtype.itemsize), dtype=dtype)
        if etype == 8:  # e.g. a vocabulary: one tight loop
            buf, pos, out = self._buf, self._pos, []
            for _ in range(count):
                if pos + 8 > len(buf):
                    raise ValueError(f"truncated at byte {pos}")
                (n,) = struct.unpack_from("<Q", buf, pos)
                if pos + 8 + n > len(buf):
                    raise ValueError(f"truncated at byte {pos}")
                out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
            self._pos = pos
            return out
        return [self._value(etype) for _ in range(count)]

    def _tensor(self, name: str, dims: list[int], ggml_type: int, offset: int) -> GGUFTensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qtype = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r} has unknown ggml type {ggml_type}") from None
        shape = tuple(reversed(dims))
        if not dims or dims[0] % block:
            raise ValueError(f"tensor {name!r}: row of {dims[:1]} values is not whole {block}-value blocks")
        row_bytes = dims[0] // block * type_size
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        if offset + rows * row_bytes > len(self._buf):
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated)")
        raw = np.frombuffer(self._buf, dtype=np.uint8, count=rows * row_bytes, offset=offset)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], row_bytes)
        return GGUFTensor(name, qtype, shape, data)
