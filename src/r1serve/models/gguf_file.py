"""A GGUF file's header, read in one pass, and its tensor data, memory-mapped.

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata:  key (u64 length + UTF-8) | value type u32 | value
    tensors:   name | dims u32 | ne0 .. ne(dims-1) u64 | ggml type u32 | offset u64
    padding to general.alignment (32), then the tensors' data

gguf-py's GGUFReader builds a numpy view per metadata element: for a 49k-token vocabulary
and its merges that is ~250k views and 4-7 seconds before the first weight is read (12+ for
Qwen's 152k). Here strings are decoded straight from the mapped bytes and numeric arrays are
one numpy view each, so the header of any R1 distill reads in well under a second. Values
come back as Python values (lists for arrays); a tensor's `data` is a numpy view of the
map in gguf-py's shapes (floats typed, block formats as rows of bytes).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_TYPED = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


class GGUFFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order: innermost (ne0) first
    data_offset: int  # from the start of the file
    n_bytes: int
    data: np.ndarray  # a view of the map: dims reversed (rows first); block formats as rows of bytes


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.map = np.memmap(self.path, mode="r")
        self._buf = memoryview(self.map)
        self._at = 0
        if bytes(self._buf[:4]) != _MAGIC:
            raise GGUFFormatError("no GGUF magic at the start of the file")
        self._at = 4
        version, n_tensors, n_kv = self._read("<I"), self._read("<Q"), self._read("<Q")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} (this reader knows 2 and 3)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I"))
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = int(self.metadata.get("general.alignment", 32))
        start = -(-self._at // alignment) * alignment
        self.tensors = [self._tensor(start, *info) for info in infos]

    # ---- the header ----------------------------------------------------------------------

    def _read(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self._at + size > len(self._buf):
            raise GGUFFormatError(f"the file ends inside its header (at byte {self._at})")
        (value,) = struct.unpack_from(fmt, self._buf, self._at)
        self._at += size
        return value

    def _string(self) -> str:
        n = self._read("<Q")
        if self._at + n > len(self._buf):
            raise GGUFFormatError(f"a string of {n} bytes runs past the end of the file (at byte {self._at})")
        text = str(self._buf[self._at:self._at + n], "utf-8", errors="replace")
        self._at += n
        return text

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._read(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind != _ARRAY:
            raise GGUFFormatError(f"unknown metadata value type {kind} (at byte {self._at})")
        item, n = self._read("<I"), self._read("<Q")
        if item in _NUMPY:  # one view for the whole array
            dtype = np.dtype(_NUMPY[item])
            if self._at + n * dtype.itemsize > len(self._buf):
                raise GGUFFormatError(f"an array of {n} values runs past the end of the file (at byte {self._at})")
            values = np.frombuffer(self._buf, dtype=dtype, count=n, offset=self._at).tolist()
            self._at += n * dtype.itemsize
            return values
        if item == _STRING:
            return self._strings(n)
        return [self._value(item) for _ in range(n)]

    def _strings(self, n: int) -> list[str]:
        # A vocabulary's 50k-150k strings: one tight loop, locals only.
        buf, at, size, out = self._buf, self._at, len(self._buf), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(n):
            (length,) = unpack(buf, at)
            at += 8
            if at + length > size:
                raise GGUFFormatError(f"a string of {length} bytes runs past the end of the file (at byte {at})")
            out.append(str(buf[at:at + length], "utf-8", errors="replace"))
            at += length
        self._at = at
        return out

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        dims = tuple(self._read("<Q") for _ in range(self._read("<I")))
        return name, dims, self._read("<I"), self._read("<Q")

    def _tensor(self, start: int, name: str, dims: tuple[int, ...], kind: int, offset: int) -> TensorInfo:
        try:
            tensor_type = GGMLQuantizationType(kind)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r} has unknown ggml type {kind}") from None
        block, nbytes = GGML_QUANT_SIZES[tensor_type]
        rows = tuple(reversed(dims))  # numpy order: rows first
        if dims[0] % block:
            raise GGUFFormatError(f"tensor {name!r}: {dims[0]} columns are not whole {tensor_type.name} blocks")
        n_bytes = int(np.prod(dims, dtype=np.int64)) // block * nbytes
        at = start + offset
        if at + n_bytes > len(self.map):
            raise GGUFFormatError(f"tensor {name!r} runs past the end of the file; it may be truncated")
        if tensor_type in _TYPED:
            data = np.ndarray(rows, dtype=_TYPED[tensor_type], buffer=self.map, offset=at)
        else:
            data = np.ndarray((*rows[:-1], rows[-1] // block * nbytes), dtype=np.uint8, buffer=self.map, offset=at)
        return TensorInfo(name, tensor_type, dims, at, n_bytes, data)
