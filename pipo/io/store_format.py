"""On-disk format of a pipo offload store: frozen index records and their JSON form.

A store is a directory holding
- ``blocks.bin``: one blob per block, in ``spec.block_names()`` order. Every blob starts at a 4 KiB
  aligned file offset and is zero-padded to a multiple of 4 KiB, so a whole blob can be read with
  ``O_DIRECT`` straight into an aligned staging buffer. Inside a blob every stored array starts at a
  4 KiB aligned offset, so each tensor is a zero-copy view of the buffer.
- ``pipo-store.json``: the index (:class:`StoreIndex`), e.g.::

    {"format": "pipo-store", "version": 1, "weights": "int4", "checksum": "crc32",
     "align_nbytes": 4096, "data_file": "blocks.bin",
     "spec": {...ModelSpec fields...},
     "source": {"path": "/models/x", "size_nbytes": 123, "mtime_ns": 456} | null,
     "blocks": [{"name": "embed", "offset_nbytes": 0, "nbytes": 8192, "crc32": 1234,
                 "tensors": [{"name": "tok", "dtype": "float16", "shape": [32, 64],
                              "offset_nbytes": 0, "nbytes": 4096, "quant": null}, ...]}, ...]}

- optionally ``tokenizer.json`` + ``tokenizer_config.json`` (Hugging Face layout).

A quantized tensor is stored as several arrays (its record's ``to_parts()``), one entry each, all
with the tensor's name and a ``quant`` record ``{"scheme", "part", "shape", "group_size"}`` where
``shape`` is the logical (dequantized) shape and ``scheme`` names the record type (:data:`RECORD_TYPES`):
``"int4"`` (:class:`pipo.ops.quant.QuantTensor`: packed codes, scales, mins) or ``"q8_0"``
(:class:`pipo.io.q8.Q8Tensor`: int8 codes, scales — GGUF Q8_0 kept as is). ``crc32`` covers the whole
padded blob.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipo.errors import ModelFormatError
from pipo.io.aligned import ALIGN_NBYTES
from pipo.io.q8 import Q8Tensor
from pipo.io.spec import ModelSpec, RopeScaling
from pipo.ops.quant import QuantTensor

FORMAT_NAME = "pipo-store"
FORMAT_VERSION = 1
INDEX_NAME = "pipo-store.json"
DATA_NAME = "blocks.bin"
WEIGHT_MODES = ("keep", "fp16", "fp32", "int4")
# quant scheme in the index -> the record type its parts rebuild (both have to_parts / from_parts)
RECORD_TYPES = {"int4": QuantTensor, "q8_0": Q8Tensor}

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True, slots=True)
class QuantParams:
    """How one stored array belongs to a quantized tensor."""

    scheme: str  # a key of RECORD_TYPES
    part: str  # key in QuantTensor.to_parts()
    shape: tuple[int, ...]  # logical shape of the whole quantized tensor
    group_size: int


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One stored array inside a block blob."""

    name: str  # canonical tensor name (shared by all parts of a quantized tensor)
    dtype: str  # key of the dtype table, e.g. "float16"
    shape: tuple[int, ...]
    offset_nbytes: int  # from the start of the blob, a multiple of ALIGN_NBYTES
    nbytes: int  # exact payload bytes (no padding)
    quant: QuantParams | None = None


@dataclass(frozen=True, slots=True)
class BlockEntry:
    """One block blob in the data file."""

    name: str
    offset_nbytes: int  # in the data file, a multiple of ALIGN_NBYTES
    nbytes: int  # padded blob size, a multiple of ALIGN_NBYTES
    crc32: int  # zlib.crc32 of the nbytes blob bytes
    tensors: tuple[TensorEntry, ...]


@dataclass(frozen=True, slots=True)
class SourceFingerprint:
    """What the store was converted from, to tell a stale store from a fresh one."""

    path: str
    size_nbytes: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class StoreIndex:
    """Everything ``pipo-store.json`` says."""

    spec: ModelSpec
    weights: str  # the convert() mode: keep / fp16 / fp32 / int4
    source: SourceFingerprint | None
    blocks: tuple[BlockEntry, ...]
    version: int = FORMAT_VERSION


def dtype_name(dtype: torch.dtype) -> str:
    """Index name of a torch dtype; ValueError for dtypes a store cannot hold."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"an offload store cannot hold tensors of dtype {dtype}")
    return _DTYPE_NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    """Torch dtype of an index dtype name; ValueError when unknown."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    return _DTYPES[name]


def fingerprint(path: str | os.PathLike | None) -> SourceFingerprint | None:
    """Path, total size and newest mtime of a source file or directory (``None`` if unknown)."""
    if path is None or not os.path.exists(path):
        return None
    root = Path(path)
    files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
    stats = [p.stat() for p in files]
    return SourceFingerprint(
        path=str(root.resolve()),
        size_nbytes=sum(s.st_size for s in stats),
        mtime_ns=max((s.st_mtime_ns for s in stats), default=root.stat().st_mtime_ns),
    )


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    """JSON-ready dict of a ModelSpec (tuples become lists)."""
    out = dataclasses.asdict(spec)
    out["eos_ids"] = list(spec.eos_ids)
    return out


def spec_from_dict(data: dict[str, Any]) -> ModelSpec:
    """Inverse of :func:`spec_to_dict`; TypeError on unknown or missing fields."""
    fields = dict(data)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    fields["eos_ids"] = tuple(fields.get("eos_ids", ()))
    return ModelSpec(**fields)


def index_to_dict(index: StoreIndex) -> dict[str, Any]:
    """JSON-ready dict of a StoreIndex (the layout shown in the module docstring)."""
    return {
        "format": FORMAT_NAME,
        "version": index.version,
        "weights": index.weights,
        "checksum": "crc32",
        "align_nbytes": ALIGN_NBYTES,
        "data_file": DATA_NAME,
        "spec": spec_to_dict(index.spec),
        "source": None if index.source is None else dataclasses.asdict(index.source),
        "blocks": [dataclasses.asdict(block) for block in index.blocks],
    }


def index_from_dict(data: Any, where: str) -> StoreIndex:
    """Parse and check an index dict; ModelFormatError naming ``where`` on any problem."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{where} is not a pipo offload store index; re-run the conversion.")
    version = data.get("version")
    if version != FORMAT_VERSION:
        raise ModelFormatError(
            f"{where} has store format version {version!r}, but this pipo reads version "
            f"{FORMAT_VERSION}; re-convert the model with this pipo."
        )
    try:
        index = StoreIndex(
            spec=spec_from_dict(data["spec"]),
            weights=_str(data["weights"]),
            source=None if data["source"] is None else SourceFingerprint(**data["source"]),
            blocks=tuple(_block_from_dict(b) for b in data["blocks"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFormatError(f"{where} is malformed ({exc!r}); re-convert the model.") from None
    _check_layout(index, where)
    return index


def _block_from_dict(data: dict[str, Any]) -> BlockEntry:
    """BlockEntry from its JSON dict (type errors propagate as TypeError/ValueError)."""
    return BlockEntry(
        name=_str(data["name"]),
        offset_nbytes=_int(data["offset_nbytes"]),
        nbytes=_int(data["nbytes"]),
        crc32=_int(data["crc32"]),
        tensors=tuple(_tensor_from_dict(t) for t in data["tensors"]),
    )


def _tensor_from_dict(data: dict[str, Any]) -> TensorEntry:
    """TensorEntry from its JSON dict."""
    quant = data["quant"]
    return TensorEntry(
        name=_str(data["name"]),
        dtype=_str(data["dtype"]),
        shape=tuple(_int(d) for d in data["shape"]),
        offset_nbytes=_int(data["offset_nbytes"]),
        nbytes=_int(data["nbytes"]),
        quant=None
        if quant is None
        else QuantParams(
            scheme=_str(quant["scheme"]),
            part=_str(quant["part"]),
            shape=tuple(_int(d) for d in quant["shape"]),
            group_size=_int(quant["group_size"]),
        ),
    )


def _check_layout(index: StoreIndex, where: str) -> None:
    """Every spec block present once, aligned blobs, every array inside its blob and self-consistent."""
    names = [block.name for block in index.blocks]
    if names != index.spec.block_names():
        raise ModelFormatError(f"{where} lists blocks {names}, not those of its model spec.")
    for block in index.blocks:
        if block.offset_nbytes % ALIGN_NBYTES or block.nbytes % ALIGN_NBYTES or block.nbytes < 0:
            raise ModelFormatError(f"{where}: block {block.name!r} is not 4 KiB aligned.")
        for entry in block.tensors:
            problem = _entry_problem(entry, block.nbytes)
            if problem:
                raise ModelFormatError(f"{where}: block {block.name!r} tensor {entry.name!r} {problem}.")


def _entry_problem(entry: TensorEntry, blob_nbytes: int) -> str | None:
    """What is wrong with one array entry, or None."""
    if entry.dtype not in _DTYPES:
        return f"has unknown dtype {entry.dtype!r}"
    if entry.quant is not None and entry.quant.scheme not in RECORD_TYPES:
        return f"has unknown quantization scheme {entry.quant.scheme!r}"
    numel = 1
    for dim in entry.shape:
        numel *= dim
    itemsize = _DTYPES[entry.dtype].itemsize
    if min(entry.shape, default=0) < 0 or numel * itemsize != entry.nbytes:
        return f"has {entry.nbytes} bytes, which does not match shape {list(entry.shape)}"
    if entry.offset_nbytes % ALIGN_NBYTES or entry.offset_nbytes < 0:
        return "is not 4 KiB aligned in its blob"
    if entry.offset_nbytes + entry.nbytes > blob_nbytes:
        return "ends past the end of its blob"
    return None


def _int(value: Any) -> int:
    """``value`` if it is a JSON integer, else TypeError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    """``value`` if it is a JSON string, else TypeError."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value
