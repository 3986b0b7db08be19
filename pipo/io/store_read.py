"""Read a pipo offload store: :class:`OffloadStore`, a WeightSource over ``blocks.bin``.

Two read paths:
- :meth:`OffloadStore.read_block` (sync): one blob into fresh aligned memory; the returned tensors are
  views of that private memory. For conversion, tests and small models.
- :meth:`OffloadStore.read_block_into` (async): one blob into a caller-owned 4 KiB aligned staging
  buffer, split into ``chunk_nbytes`` pieces with up to ``depth`` ``preadv`` calls in flight (each in
  the event loop's executor through ``aiofiles.os.wrap``; ``preadv`` is positional, so one shared file
  descriptor is safe). The returned tensors are views into the buffer: zero copies, and the caller must
  not refill the buffer while they are in use. Reads use ``O_DIRECT`` where the file system allows it,
  so streaming a model leaves neither process memory nor the page cache growing; otherwise buffered
  reads, with ``posix_fadvise`` asking for sequential read-ahead and dropping each blob's pages once read.

Opening validates the index (missing, corrupt, unknown version, inconsistent layout, data file shorter
than the index says): each is one :class:`~pipo.errors.ModelFormatError` naming the path and block.
Checksums are only checked by :meth:`OffloadStore.verify` (one full read of the store).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import zlib
from pathlib import Path
from typing import Any

import aiofiles.os
import torch

from pipo.errors import ModelFormatError
from pipo.io.aligned import ALIGN_NBYTES, aligned_empty, is_aligned
from pipo.io.progress import LoadProgress
from pipo.io.spec import ModelSpec
from pipo.io.store_format import (
    DATA_NAME,
    INDEX_NAME,
    RECORD_TYPES,
    BlockEntry,
    SourceFingerprint,
    StoreIndex,
    TensorEntry,
    dtype_from_name,
    index_from_dict,
)

DEFAULT_CHUNK_NBYTES = 8 << 20
DEFAULT_DEPTH = 4
_apreadv = aiofiles.os.wrap(os.preadv)


class OffloadStore:
    """A converted model on disk, read block by block (implements the WeightSource protocol).

    ``direct``: ``None`` uses ``O_DIRECT`` for async reads when the file system supports it and falls
    back to buffered reads otherwise; ``True`` requires it; ``False`` forces buffered reads.
    The store owns two file descriptors (sync and async reads); :meth:`close` releases them.
    """

    def __init__(self, path: str | os.PathLike, *, direct: bool | None = None) -> None:
        self._path = Path(path)
        self._index = load_index(self._path)
        self._blocks = {block.name: block for block in self._index.blocks}
        self._data_path = self._path / DATA_NAME
        self._fd = _open_data(self._data_path, self._index)
        self._direct_request = direct
        self._async_fd: int | None = None
        self._direct: bool | None = None
        self._tokenizer: Any = None
        self._progress = LoadProgress(self.spec.name or self._path.name, self.spec.block_names())

    @property
    def spec(self) -> ModelSpec:
        """Architecture of the stored model."""
        return self._index.spec

    @property
    def path(self) -> Path:
        """The store directory."""
        return self._path

    @property
    def index(self) -> StoreIndex:
        """The parsed ``pipo-store.json``."""
        return self._index

    @property
    def source_fingerprint(self) -> SourceFingerprint | None:
        """Path, size and mtime of what the store was converted from."""
        return self._index.source

    @property
    def tokenizer(self) -> Any:
        """The tokenizer saved beside the blocks, or ``None`` when the store has none."""
        if self._tokenizer is None and (self._path / "tokenizer.json").exists():
            from pipo.io.tokenizer import tokenizer_from_hf_dir

            self._tokenizer = tokenizer_from_hf_dir(self._path, self.spec)
        return self._tokenizer

    @property
    def max_block_nbytes(self) -> int:
        """Size of the largest blob: a staging buffer of this size holds any block."""
        return max(block.nbytes for block in self._index.blocks)

    @property
    def int4_group_size(self) -> int | None:
        """The smallest group size of the store's int4 weights; ``None`` when it holds none."""
        groups = [t.quant.group_size for b in self._index.blocks for t in b.tensors
                  if t.quant is not None and t.quant.scheme == "int4"]
        return min(groups, default=None)

    @property
    def direct(self) -> bool | None:
        """Whether async reads use ``O_DIRECT`` (``None`` before the first async read)."""
        return self._direct

    def block_nbytes(self, block: str) -> int:
        """Bytes of ``block`` as stored: its blob, tensors plus 4 KiB alignment padding.

        This is the staging buffer size :meth:`read_block_into` needs, and the memory the tensors of
        :meth:`read_block` hold (they are views of one blob-sized allocation).
        """
        return self._entry(block).nbytes

    def read_block(self, block: str) -> dict[str, Any]:
        """Canonical tensors of ``block`` (quantized ones as their records), in fresh memory of their own."""
        entry = self._entry(block)
        blob = aligned_empty(entry.nbytes)
        _pread_full(self._fd, memoryview(blob.numpy()), entry.offset_nbytes, self._where(entry))
        self._progress.done(block)
        return _tensors_from_blob(blob, entry.tensors)

    async def read_block_into(
        self,
        block: str,
        buffer: torch.Tensor,
        *,
        chunk_nbytes: int = DEFAULT_CHUNK_NBYTES,
        depth: int = DEFAULT_DEPTH,
    ) -> dict[str, Any]:
        """Read ``block`` into ``buffer`` (uint8, 4 KiB aligned, >= block_nbytes) and return views of it.

        The blob is read as ``chunk_nbytes`` pieces (a multiple of 4 KiB) with ``depth`` reads in
        flight. The returned tensors alias ``buffer``: reuse the buffer only once they are dead.
        """
        entry = self._entry(block)
        _check_staging(buffer, entry, chunk_nbytes, depth)
        view = memoryview(buffer.numpy())[: entry.nbytes]
        try:
            await self._read_chunks(view, entry, chunk_nbytes, depth)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct or self._direct_request:
                raise
            self._reopen_async(direct=False)  # the file system refused O_DIRECT reads
            await self._read_chunks(view, entry, chunk_nbytes, depth)
        return _tensors_from_blob(buffer[: entry.nbytes], entry.tensors)

    def table_rows(self, block: str, name: str):
        """Tensor ``name`` of ``block`` as a :class:`~pipo.io.store_rows.StoredRows` (read by rows
        on demand), or ``None`` unless it is a Q8_0 table alone in its block."""
        from pipo.io.store_rows import stored_rows

        return stored_rows(self._fd, self._entry(block), name)

    def verify(self) -> None:
        """Read every blob and check its crc32; ModelFormatError naming the first bad block."""
        buffer = aligned_empty(self.max_block_nbytes)
        for entry in self._index.blocks:
            view = memoryview(buffer.numpy())[: entry.nbytes]
            _pread_full(self._fd, view, entry.offset_nbytes, self._where(entry))
            crc32 = zlib.crc32(view)
            if crc32 != entry.crc32:
                raise ModelFormatError(
                    f"{self._data_path}: block {entry.name!r} fails its checksum (crc32 {crc32:#010x}, "
                    f"index says {entry.crc32:#010x}); the store is corrupt, convert the model again."
                )

    def close(self) -> None:
        """Close the store's file descriptors (idempotent)."""
        for fd in (self._fd, self._async_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd, self._async_fd = -1, None

    def __enter__(self) -> OffloadStore:
        """Use the store in a ``with`` block; it closes on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the file descriptors."""
        self.close()

    def __del__(self) -> None:
        """Close the file descriptors of a store nobody closed."""
        if getattr(self, "_fd", -1) >= 0:  # __init__ may have failed before opening
            self.close()

    def _entry(self, block: str) -> BlockEntry:
        """Index entry of ``block``; KeyError naming the valid blocks when unknown."""
        if block not in self._blocks:
            raise KeyError(f"{self._path} has no block {block!r}; blocks: {list(self._blocks)}")
        return self._blocks[block]

    def _where(self, entry: BlockEntry) -> str:
        """Human-readable location of a block, for error messages."""
        return f"{self._data_path} block {entry.name!r}"

    async def _read_chunks(
        self, view: memoryview, entry: BlockEntry, chunk_nbytes: int, depth: int
    ) -> None:
        """Fill ``view`` with the blob of ``entry`` using up to ``depth`` concurrent reads."""
        if self._async_fd is None:
            self._reopen_async(direct=self._direct_request is not False)
        fd, where = self._async_fd, self._where(entry)
        starts = iter(range(0, entry.nbytes, chunk_nbytes))

        async def reader() -> None:
            """Take chunks until none are left; ``depth`` of these run at once."""
            for start in starts:  # shared iterator: each chunk is taken by exactly one reader
                piece = view[start : start + chunk_nbytes]
                await _apread_full(fd, piece, entry.offset_nbytes + start, where)

        if not self._direct:
            os.posix_fadvise(fd, entry.offset_nbytes, entry.nbytes, os.POSIX_FADV_WILLNEED)
        n_chunks = -(-len(view) // chunk_nbytes)
        await _gather_all([reader() for _ in range(max(1, min(depth, n_chunks)))])
        if not self._direct:
            os.posix_fadvise(fd, entry.offset_nbytes, entry.nbytes, os.POSIX_FADV_DONTNEED)

    def _reopen_async(self, *, direct: bool) -> None:
        """(Re)open the async-read descriptor, with O_DIRECT if asked and allowed."""
        if self._async_fd is not None:
            os.close(self._async_fd)
        self._async_fd, self._direct = _open_async(self._data_path, direct, self._direct_request)


def load_index(path: Path) -> StoreIndex:
    """Parse and validate ``path/pipo-store.json``; ModelFormatError on any problem."""
    index_path = path / INDEX_NAME
    if not index_path.is_file():
        raise ModelFormatError(
            f"{path} is not a pipo offload store (no {INDEX_NAME}); convert the model first."
        )
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{index_path} is not valid JSON ({exc}); convert the model again.")
    return index_from_dict(data, str(index_path))


def _open_data(data_path: Path, index: StoreIndex) -> int:
    """Open the data file for buffered reads, checking that every blob lies inside it."""
    try:
        fd = os.open(data_path, os.O_RDONLY)
    except OSError as exc:
        raise ModelFormatError(f"cannot open {data_path} ({exc.strerror}); convert the model again.")
    size_nbytes = os.fstat(fd).st_size
    for block in index.blocks:
        if block.offset_nbytes + block.nbytes > size_nbytes:
            os.close(fd)
            raise ModelFormatError(
                f"{data_path} is truncated: block {block.name!r} ends at byte "
                f"{block.offset_nbytes + block.nbytes} but the file has {size_nbytes} bytes; "
                "convert the model again."
            )
    return fd


def _open_async(data_path: Path, direct: bool, required: bool | None) -> tuple[int, bool]:
    """Descriptor for async reads and whether it is O_DIRECT (fallback unless ``required``)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(data_path, os.O_RDONLY | os.O_DIRECT), True
        except OSError as exc:
            if required or exc.errno != errno.EINVAL:
                raise
    elif direct and required:
        raise OSError(errno.EINVAL, "O_DIRECT is not available on this platform")
    fd = os.open(data_path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return fd, False


def _check_staging(buffer: torch.Tensor, entry: BlockEntry, chunk_nbytes: int, depth: int) -> None:
    """ValueError unless ``buffer`` can take ``entry``'s blob with direct reads."""
    if buffer.dtype != torch.uint8 or buffer.device.type != "cpu" or not buffer.is_contiguous():
        raise ValueError("the staging buffer must be a contiguous uint8 CPU tensor")
    if not is_aligned(buffer):
        raise ValueError("the staging buffer must start on a 4 KiB boundary (use aligned_empty)")
    if buffer.numel() < entry.nbytes:
        raise ValueError(f"block {entry.name!r} needs {entry.nbytes} bytes, buffer has {buffer.numel()}")
    if chunk_nbytes <= 0 or chunk_nbytes % ALIGN_NBYTES or depth < 1:
        raise ValueError("chunk_nbytes must be a positive multiple of 4096 and depth >= 1")


def _tensors_from_blob(blob: torch.Tensor, entries: tuple[TensorEntry, ...]) -> dict[str, Any]:
    """Canonical dict of views into ``blob``; quantized parts are regrouped into QuantTensors."""
    out: dict[str, Any] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for entry in entries:
        raw = blob[entry.offset_nbytes : entry.offset_nbytes + entry.nbytes]
        view = raw.view(dtype_from_name(entry.dtype)).view(entry.shape)
        if entry.quant is None:
            out[entry.name] = view
        else:
            out.setdefault(entry.name, None)  # keep the index order
            parts.setdefault(entry.name, {})[entry.quant.part] = view
    if parts:
        quant = {e.name: e.quant for e in entries if e.quant is not None}
        for name, tensor_parts in parts.items():
            params = quant[name]
            out[name] = RECORD_TYPES[params.scheme].from_parts(tensor_parts, params.shape, params.group_size)
    return out


def _pread_full(fd: int, view: memoryview, offset_nbytes: int, where: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset_nbytes``; ModelFormatError if the file ends first."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset_nbytes + done)
        if got == 0:
            raise ModelFormatError(f"{where} is truncated; convert the model again.")
        done += got


async def _apread_full(fd: int, view: memoryview, offset_nbytes: int, where: str) -> None:
    """Async :func:`_pread_full` through the event loop's executor."""
    done = 0
    while done < len(view):
        got = await _apreadv(fd, [view[done:]], offset_nbytes + done)
        if got == 0:
            raise ModelFormatError(f"{where} is truncated; convert the model again.")
        done += got


async def _gather_all(coroutines: list) -> None:
    """Run coroutines concurrently, wait for all of them, then raise the first error if any.

    Waiting for all matters: a read in an executor thread cannot be cancelled, and returning while one
    still writes into the caller's buffer would hand the buffer back too early.
    """
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
