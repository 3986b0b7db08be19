"""Convert any weight source into a pipo offload store (layout: :mod:`pipo.io.store_format`).

Policy. The store is written into a fresh hidden work directory next to ``out_dir``, named after the
writing process (:mod:`pipo.io.store_tmp`), and only renamed to ``out_dir`` once the data file, the
index and the tokenizer files are complete and fsynced; any exception (including the test hook
``fail_after_blocks``) removes that directory, so a reader never sees a half-written store, and work
directories left by killed writers are removed by the next convert into the same parent. ``overwrite``
replaces an existing pipo store only (a directory whose ``pipo-store.json`` parses); anything else at
``out_dir`` is refused, never deleted. Blocks are converted one at a time: peak memory is one block's
source tensors plus its blob.

Weight modes: ``keep`` stores tensors as the source gives them — GGUF Q4_0 / Q4_1 blocks as int4
records and Q8_0 ones as q8_0 records, bit for bit; ``fp16`` / ``fp32`` dequantize records and cast
floating tensors; ``int4`` is ``keep`` plus quantizing the layers' linear weights that are not 4-bit yet
(dense or Q8_0) with :func:`pipo.ops.quant.quantize`, as the engine's ``--weights int4`` does:
embeddings and the LM head stay as they are, and 4-bit weights are never quantized again.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch

from pipo.errors import ModelFormatError, PipoError
from pipo.io.aligned import align_up
from pipo.io.q8 import Q8Tensor, to_dense
from pipo.io.store_format import (
    DATA_NAME,
    INDEX_NAME,
    RECORD_TYPES,
    WEIGHT_MODES,
    BlockEntry,
    QuantParams,
    StoreIndex,
    TensorEntry,
    dtype_name,
    fingerprint,
    index_to_dict,
)
from pipo.io.store_tmp import make_work_dir, remove_stale_work_dirs
from pipo.ops.quant import INT4_GROUP_SIZES, quantize

_CAST_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_SCHEMES = {record: scheme for scheme, record in RECORD_TYPES.items()}

# One stored array before layout: (tensor name, bytes as a tensor, quant params or None).
_Array = tuple[str, torch.Tensor, QuantParams | None]


def convert(
    source: Any,
    out_dir: str | os.PathLike,
    *,
    weights: str = "keep",
    group_size: int = 64,
    overwrite: bool = False,
    fail_after_blocks: int | None = None,
) -> Path:
    """Write ``source`` (a WeightSource) as an offload store in ``out_dir`` and return its path.

    ``weights`` is one of keep / fp16 / fp32 / int4; ``group_size`` (32, 64 or 128) is the group of
    dense weights quantized by ``int4``. An existing ``out_dir`` is a PipoError unless ``overwrite``
    and it is a pipo store. ``fail_after_blocks=N`` raises after N blocks are written (tests of the
    cleanup path).
    """
    if weights not in WEIGHT_MODES:
        raise PipoError(f"Unknown weights mode {weights!r}; use one of {', '.join(WEIGHT_MODES)}.")
    if group_size not in INT4_GROUP_SIZES:
        raise PipoError(f"--group-size must be 32, 64 or 128, got {group_size}")
    out_path = Path(out_dir)
    _check_destination(out_path, overwrite)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(out_path.parent)
    tmp_path = make_work_dir(out_path)
    try:
        blocks = _write_blocks(source, tmp_path / DATA_NAME, weights, group_size, fail_after_blocks)
        index = StoreIndex(
            spec=source.spec, weights=weights, source=fingerprint(source.path), blocks=blocks
        )
        _write_json(tmp_path / INDEX_NAME, index_to_dict(index))
        _save_tokenizer(source.tokenizer, tmp_path)
        _fsync_path(tmp_path)
        _install(tmp_path, out_path, overwrite)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise
    return out_path


def _check_destination(out_path: Path, overwrite: bool) -> None:
    """PipoError unless ``out_path`` is free, or ``overwrite`` and it holds a pipo store."""
    if not out_path.exists() and not out_path.is_symlink():
        return
    if not overwrite:
        raise PipoError(f"{out_path} already exists; choose another directory or pass overwrite=True.")
    refusal = f"refusing to overwrite {out_path}: it is not a pipo store"
    if out_path.is_symlink():
        raise PipoError(f"{refusal} (a symbolic link); remove it yourself or choose another directory.")
    if not out_path.is_dir():
        raise PipoError(f"{refusal} (a file); remove it yourself or choose another directory.")
    from pipo.io.store_read import load_index

    try:
        load_index(out_path)
    except ModelFormatError:
        raise PipoError(
            f"{refusal} (no readable {INDEX_NAME}); remove it yourself or choose another directory."
        ) from None


def _write_blocks(
    source: Any, data_path: Path, weights: str, group_size: int, fail_after_blocks: int | None
) -> tuple[BlockEntry, ...]:
    """Write every block blob into ``data_path``, back to back, and return their index entries."""
    entries = []
    offset_nbytes = 0
    with open(data_path, "wb") as data_file:
        for block in source.spec.block_names():
            if fail_after_blocks is not None and len(entries) >= fail_after_blocks:
                raise RuntimeError(f"convert stopped after {fail_after_blocks} blocks (test hook)")
            arrays = _block_arrays(source.read_block(block), weights, group_size)
            tensors, blob = _pack(arrays)
            data_file.write(blob.numpy())
            entries.append(
                BlockEntry(block, offset_nbytes, blob.numel(), zlib.crc32(blob.numpy()), tensors)
            )
            offset_nbytes += blob.numel()
        data_file.flush()
        os.fsync(data_file.fileno())
    return tuple(entries)


def _block_arrays(tensors: dict[str, Any], weights: str, group_size: int) -> list[_Array]:
    """The arrays to store for one block's canonical tensors, after the weights-mode conversion."""
    arrays: list[_Array] = []
    for name, value in tensors.items():
        stored = _converted(name, value, weights, group_size)
        if isinstance(stored, torch.Tensor):
            arrays.append((name, stored, None))
        else:
            arrays += _record_arrays(name, stored)
    return arrays


def _converted(name: str, value: Any, weights: str, group_size: int) -> Any:
    """One tensor as ``weights`` stores it: a dense tensor or a quantized record."""
    if weights in _CAST_DTYPES:
        return to_dense(value, _CAST_DTYPES[weights])
    if weights == "int4" and _is_layer_matrix(name, value):
        return quantize(to_dense(value), group_size)
    return value


def _is_layer_matrix(name: str, value: Any) -> bool:
    """Whether ``int4`` mode quantizes this tensor: a layer's linear weight, dense or 8-bit (as the
    engine's ``--weights int4`` does); never embeddings or the LM head, never a weight already 4-bit."""
    if not name.startswith("w") or name == "w_out":
        return False
    if isinstance(value, torch.Tensor):
        return value.ndim == 2 and value.is_floating_point()
    return isinstance(value, Q8Tensor)


def _record_arrays(name: str, record: Any) -> list[_Array]:
    """One array per part of a quantized record, all tagged with its scheme, logical shape and group."""
    shape = tuple(int(d) for d in record.shape)
    scheme = _SCHEMES[type(record)]
    return [
        (name, part, QuantParams(scheme, part_name, shape, int(record.group_size)))
        for part_name, part in record.to_parts().items()
    ]


def _pack(arrays: list[_Array]) -> tuple[tuple[TensorEntry, ...], torch.Tensor]:
    """Lay arrays out at 4 KiB aligned offsets in one zero-padded blob; return entries and blob."""
    entries = []
    offset_nbytes = 0
    for name, tensor, quant in arrays:
        nbytes = tensor.numel() * tensor.element_size()
        shape = tuple(tensor.shape)
        entries.append(TensorEntry(name, dtype_name(tensor.dtype), shape, offset_nbytes, nbytes, quant))
        offset_nbytes = align_up(offset_nbytes + nbytes)
    blob = torch.zeros(offset_nbytes, dtype=torch.uint8)
    for entry, (_, tensor, _) in zip(entries, arrays):
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        blob[entry.offset_nbytes : entry.offset_nbytes + entry.nbytes] = flat
    return tuple(entries), blob


def _save_tokenizer(tokenizer: Any, store_path: Path) -> None:
    """Save the source's tokenizer (if any) in HF layout beside the store, fsynced."""
    if tokenizer is None:
        return
    tokenizer.save(store_path)
    for name in _TOKENIZER_FILES:
        with open(store_path / name, "rb") as file:
            os.fsync(file.fileno())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON and fsync it."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=1)
        file.flush()
        os.fsync(file.fileno())


def _fsync_path(path: Path) -> None:
    """fsync a directory so the names in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(tmp_path: Path, out_path: Path, overwrite: bool) -> None:
    """Atomically move the finished store to ``out_path``, replacing an old store (``overwrite``).

    The destination is checked again first: what appeared there during the conversion is no more
    replaceable than what was there before it. The old store is removed only once the new one is in.
    """
    old_path = None
    if out_path.exists() or out_path.is_symlink():
        _check_destination(out_path, overwrite)
        old_path = tmp_path.with_name(tmp_path.name + ".old")
        os.replace(out_path, old_path)
    os.replace(tmp_path, out_path)
    _fsync_path(out_path.parent)
    if old_path is not None:
        shutil.rmtree(old_path)
