"""One pass over a GGUF file's header: metadata, the tensor index, and zero-copy views of tensor data.

``gguf.GGUFReader`` builds a numpy memmap view per metadata item (about a million of them for a
49k-token vocabulary: seconds before the first weight is read). This parser walks the header with
``struct`` over a private memory map, decodes strings directly, turns numeric arrays into lists with
one ``np.frombuffer`` each, and leaves tensor data in the map: :meth:`GGUFTensorInfo.raw` is a view.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata count,
the metadata ``(key, u32 type, value)``, per tensor ``(name, u32 n_dims, u64 dims innermost-first,
u32 ggml type, u64 offset)``, then the data section at the next ``general.alignment`` boundary.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipo.errors import ModelFormatError

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
# metadata value type -> struct format / numpy dtype
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
# ggml type id -> (name, elements per block, bytes per block) for the types pipo reads
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of the index. ``shape`` is torch order (outermost first); ``offset`` is absolute."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    offset: int
    n_bytes: int
    buffer: Any  # the file's memory map

    @property
    def type_name(self) -> str:
        """``F32``, ``Q4_1``, ...; for types pipo does not read, gguf's own name of the type."""
        if self.type_id in GGML_TYPES:
            return GGML_TYPES[self.type_id][0]
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type {self.type_id}"

    @property
    def n_elements(self) -> int:
        """Number of values the tensor stands for."""
        return int(np.prod(self.shape, dtype=np.int64))

    def raw(self) -> np.ndarray:
        """The stored bytes, uint8 ``[rows, bytes per row]`` (``[bytes]`` for 1-D), a view of the map."""
        data = np.frombuffer(self.buffer, dtype=np.uint8, count=self.n_bytes, offset=self.offset)
        return data.reshape(self.shape[0], -1) if len(self.shape) == 2 else data


@dataclass(frozen=True)
class GGUFContents:
    """What :func:`parse_gguf` found: decoded metadata and the tensor index, in file order."""

    meta: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


def parse_gguf(path: Path) -> GGUFContents:
    """Parse ``path``; ModelFormatError naming it when it is missing, malformed or truncated."""
    try:
        with open(path, "rb") as file:
            buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        raise ModelFormatError(f"no such file or directory: {path}") from None
    except (OSError, ValueError) as err:  # ValueError: an empty file cannot be mapped
        raise ModelFormatError(f"{path} is not a valid GGUF file (corrupt or truncated): {err}") from None
    try:
        return _parse(buffer)
    except (struct.error, ValueError, UnicodeDecodeError, OverflowError, IndexError) as err:
        raise ModelFormatError(f"{path} is not a valid GGUF file (corrupt or truncated): {err}") from None


class _Cursor:
    """Sequential little-endian reads from a buffer."""

    def __init__(self, buffer: Any) -> None:
        self.buffer, self.pos = buffer, 0

    def scalar(self, fmt: str) -> Any:
        """One struct value of format ``fmt``."""
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        """A u64-length-prefixed UTF-8 string."""
        n = self.scalar("<Q")
        if self.pos + n > len(self.buffer):
            raise ValueError("a string runs past the end of the file")
        text = self.buffer[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return text

    def value(self, kind: int) -> Any:
        """A metadata value of type ``kind`` (arrays become lists)."""
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.scalar(_SCALARS[kind])

    def array(self) -> list:
        """An array value: element type, count, elements."""
        kind, count = self.scalar("<I"), self.scalar("<Q")
        if kind in _NUMPY:
            dtype = np.dtype(_NUMPY[kind])
            if self.pos + count * dtype.itemsize > len(self.buffer):
                raise ValueError("an array runs past the end of the file")
            values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return values.tolist()
        if kind == _STRING:
            return self.strings(count)
        return [self.value(kind) for _ in range(count)]

    def strings(self, count: int) -> list[str]:
        """``count`` strings back to back (a vocabulary: the one loop of the parse worth keeping tight)."""
        buffer, pos, unpack = self.buffer, self.pos, _U64.unpack_from
        out = []
        for _ in range(count):
            (n,) = unpack(buffer, pos)
            out.append(buffer[pos + 8 : pos + 8 + n].decode("utf-8"))
            pos += 8 + n
        if pos > len(buffer):
            raise ValueError("a string runs past the end of the file")
        self.pos = pos
        return out


def _parse(buffer: Any) -> GGUFContents:
    """Header, metadata and tensor index of a mapped GGUF file."""
    cursor = _Cursor(buffer)
    if buffer[:4] != _MAGIC:
        raise ValueError("bad magic (not GGUF)")
    cursor.pos = 4
    version, n_tensors, n_meta = cursor.scalar("<I"), cursor.scalar("<Q"), cursor.scalar("<Q")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    meta = {}
    for _ in range(n_meta):
        key = cursor.string()
        meta[key] = cursor.value(cursor.scalar("<I"))
    index = [_tensor_header(cursor) for _ in range(n_tensors)]
    alignment = int(meta.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, dims, type_id, offset in index:
        info = _tensor_info(name, dims, type_id, data_start + offset, buffer)
        if info.offset + info.n_bytes > len(buffer):
            raise ValueError(f"tensor {name} ends past the end of the file")
        tensors[name] = info
    return GGUFContents(meta, tensors)


def _tensor_header(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    """Name, dims (innermost first), ggml type id and data offset of one index entry."""
    name = cursor.string()
    n_dims = cursor.scalar("<I")
    if not 1 <= n_dims <= 4:
        raise ValueError(f"tensor {name} has {n_dims} dimensions")
    dims = tuple(cursor.scalar("<Q") for _ in range(n_dims))
    return name, dims, cursor.scalar("<I"), cursor.scalar("<Q")


def _tensor_info(name: str, dims: tuple[int, ...], type_id: int, offset: int, buffer: Any) -> GGUFTensorInfo:
    """The index entry with torch-order shape and byte size (0 bytes for types pipo does not read)."""
    shape = tuple(int(d) for d in reversed(dims))
    n_bytes = 0
    if type_id in GGML_TYPES:
        _, block, block_nbytes = GGML_TYPES[type_id]
        if shape[-1] % block:
            raise ValueError(f"tensor {name} rows of {shape[-1]} values are not whole {block}-value blocks")
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * block_nbytes
    return GGUFTensorInfo(name, type_id, shape, offset, n_bytes, buffer)
