"""An embedding table left in an offload store, read by rows: :class:`StoredRows`.

A disk-streamed step needs only the rows of its own tokens, not the whole table (30 MB for the
default model's Q8_0 table, against ~8 KB of rows for a decode step). The store keeps every part of a
record row-major, so row ``i`` of a part is ``row_nbytes`` bytes at ``part offset + i * row_nbytes``:
:meth:`StoredRows.rows` reads each distinct id's row of every part with one ``pread`` (buffered, on
the store's sync descriptor) and looks them up as the record would: a Q8_0 table's rows
dequantized to fp32, a dense table's rows as stored (the 113 MB fp32 table of the default model
read as 2.3 KB rows per token instead of whole every step).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from pipo.io.q8 import Q8Tensor
from pipo.io.store_format import BlockEntry, dtype_from_name


@dataclass(frozen=True, slots=True)
class RowPart:
    """One stored part of the table: absolute offset in the data file, bytes and shape of a row."""

    offset_nbytes: int
    row_nbytes: int
    dtype: torch.dtype
    row_shape: tuple[int, ...]


DENSE_PART = "dense"


@dataclass(slots=True, eq=False)
class StoredRows:
    """An embedding table ``[vocab, hidden]`` in the store (Q8_0, ``group_size`` set, or dense:
    one part, ``group_size`` ``None``); :meth:`rows` reads only the rows asked for.

    ``out_dtype``: the dtype the rows are computed on (``None``: as stored, Q8_0 rows as fp32).
    ``nbytes_read`` counts the bytes read so far (a benchmark's bytes per token).
    """

    fd: int
    parts: dict[str, RowPart]
    shape: tuple[int, int]
    group_size: int | None
    out_dtype: torch.dtype | None = None
    nbytes_read: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) as ``[*ids.shape, hidden]`` on ``ids``' device: what
        :meth:`~pipo.io.q8.Q8Tensor.rows` of the whole Q8_0 table gives (fp32), or indexing the
        whole dense table, then cast to ``out_dtype``."""
        unique, inverse = torch.unique(ids.reshape(-1).cpu(), return_inverse=True)
        wanted = unique.tolist()
        if wanted and not 0 <= wanted[0] <= wanted[-1] < self.shape[0]:
            raise IndexError(f"token id out of range for an embedding table of {self.shape[0]} rows")
        read = {name: self._read(part, wanted) for name, part in self.parts.items()}
        if self.group_size is None:
            out = read[DENSE_PART][inverse]                                # [n, hidden] as stored
        else:
            table = Q8Tensor.from_parts(read, (len(wanted), self.shape[1]), self.group_size)
            out = table.rows(inverse)                                      # [n, hidden] fp32
        out = out.to(self.out_dtype) if self.out_dtype is not None else out
        return out.view(*ids.shape, self.shape[1]).to(ids.device)

    def _read(self, part: RowPart, wanted: list[int]) -> torch.Tensor:
        """Rows ``wanted`` of one part: ``[len(wanted), *row_shape]``."""
        out = np.empty((len(wanted), part.row_nbytes), np.uint8)
        for i, row in enumerate(wanted):
            got = os.preadv(self.fd, [memoryview(out[i])], part.offset_nbytes + row * part.row_nbytes)
            if got != part.row_nbytes:
                raise OSError(f"short read of an embedding row ({got} of {part.row_nbytes} bytes)")
        with self._lock:
            self.nbytes_read += out.size
        return torch.from_numpy(out).view(part.dtype).view(len(wanted), *part.row_shape)


def stored_rows(fd: int, entry: BlockEntry, name: str) -> StoredRows | None:
    """Tensor ``name`` of block ``entry`` as :class:`StoredRows`; ``None`` unless it is a Q8_0 or a
    dense 2-D table and the block holds nothing else."""
    found = [t for t in entry.tensors if t.name == name]
    if not found or len(found) != len(entry.tensors):
        return None
    if len(found) == 1 and found[0].quant is None and len(found[0].shape) == 2:
        t = found[0]
        part = RowPart(entry.offset_nbytes + t.offset_nbytes, t.nbytes // t.shape[0],
                       dtype_from_name(t.dtype), (int(t.shape[1]),))
        return StoredRows(fd, {DENSE_PART: part}, (int(t.shape[0]), int(t.shape[1])), None)
    if any(t.quant is None or t.quant.scheme != "q8_0" for t in found):
        return None
    parts = {}
    for t in found:
        n_rows = t.shape[0]
        parts[t.quant.part] = RowPart(entry.offset_nbytes + t.offset_nbytes, t.nbytes // n_rows,
                                      dtype_from_name(t.dtype), tuple(t.shape[1:]))
    q = found[0].quant
    return StoredRows(fd, parts, (int(q.shape[0]), int(q.shape[1])), q.group_size)
