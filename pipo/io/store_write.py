"""Convert any weight source into a pipo offload store (layout: :mod:`pipo.io.store_format`).

Policy. The store is written into a fresh hidden directory next to ``out_dir`` and only renamed to
``out_dir`` once the data file, the index and the tokenizer files are complete and fsynced; any
exception (including the test hook ``fail_after_blocks``) removes that directory, so a reader never sees
a half-written store and no stray files are left. Blocks are converted one at a time: peak memory is
one block's source tensors plus its blob.

Weight modes: ``keep`` stores tensors as the source gives them; ``fp16``/``fp32`` cast floating tensors;
``int4`` quantizes 2-D linear weights (names starting with ``w``; embeddings ``tok``/``pos`` never)
with :func:`pipo.ops.quant.quantize` and casts the other floating tensors to fp16.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

from pipo.errors import PipoError
from pipo.io.aligned import align_up
from pipo.io.store_format import (
    DATA_NAME,
    INDEX_NAME,
    WEIGHT_MODES,
    BlockEntry,
    QuantParams,
    StoreIndex,
    TensorEntry,
    dtype_name,
    fingerprint,
    index_to_dict,
)
from pipo.ops.quant import QuantTensor, dequantize, quantize

_CAST_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "int4": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

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

    ``weights`` is one of keep / fp16 / fp32 / int4; ``group_size`` is the int4 quantization group.
    An existing ``out_dir`` is a PipoError unless ``overwrite``. ``fail_after_blocks=N`` raises after
    N blocks are written (tests of the cleanup path).
    """
    if weights not in WEIGHT_MODES:
        raise PipoError(f"Unknown weights mode {weights!r}; use one of {', '.join(WEIGHT_MODES)}.")
    out_path = Path(out_dir)
    if out_path.exists() and not overwrite:
        raise PipoError(f"{out_path} already exists; choose another directory or pass overwrite=True.")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        blocks = _write_blocks(source, tmp_path / DATA_NAME, weights, group_size, fail_after_blocks)
        index = StoreIndex(
            spec=source.spec, weights=weights, source=fingerprint(source.path), blocks=blocks
        )
        _write_json(tmp_path / INDEX_NAME, index_to_dict(index))
        _save_tokenizer(source.tokenizer, tmp_path)
        _fsync_path(tmp_path)
        _install(tmp_path, out_path)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise
    return out_path


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
        if isinstance(value, QuantTensor) and weights in ("keep", "int4"):
            arrays += _quant_arrays(name, value)
        elif isinstance(value, QuantTensor):
            arrays.append((name, dequantize(value).to(_CAST_DTYPES[weights]), None))
        elif weights == "int4" and _is_linear_weight(name, value):
            arrays += _quant_arrays(name, quantize(value, group_size))
        elif weights != "keep" and value.is_floating_point():
            arrays.append((name, value.to(_CAST_DTYPES[weights]), None))
        else:
            arrays.append((name, value, None))
    return arrays


def _is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    """Whether ``int4`` mode quantizes this tensor: 2-D linear weights, never embeddings."""
    return name.startswith("w") and tensor.ndim == 2 and tensor.is_floating_point()


def _quant_arrays(name: str, quant: QuantTensor) -> list[_Array]:
    """One array per QuantTensor part, all tagged with the tensor's logical shape and group size."""
    shape = tuple(int(d) for d in quant.shape)
    return [
        (name, part, QuantParams("int4", part_name, shape, int(quant.group_size)))
        for part_name, part in quant.to_parts().items()
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


def _install(tmp_path: Path, out_path: Path) -> None:
    """Atomically move the finished store to ``out_path``, replacing an old one (overwrite=True)."""
    old_path = None
    if out_path.exists() or out_path.is_symlink():
        old_path = tmp_path.with_name(tmp_path.name + ".old")
        os.replace(out_path, old_path)
    os.replace(tmp_path, out_path)
    _fsync_path(out_path.parent)
    if old_path is not None:
        if old_path.is_dir() and not old_path.is_symlink():
            shutil.rmtree(old_path)
        else:
            old_path.unlink()
