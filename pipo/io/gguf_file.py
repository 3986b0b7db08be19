"""Block-by-block reads of a llama.cpp GGUF file (llama architecture).

The file is parsed once with ``gguf.GGUFReader`` (a memory map: metadata is decoded, tensor data
is not read). Tensors of type F32, F16, Q8_0, Q4_0 and Q4_1 are supported; any other type is
refused when opening, naming the type, so a model never fails halfway through a run.

Two llama.cpp conventions are undone so our weights equal Hugging Face's:

* GGUF lists dims innermost-first; the reader's arrays are already ``[rows, cols]`` like torch.
* ``convert_hf_to_gguf.py`` permutes the rows of ``attn_q`` / ``attn_k`` (per head, from HF's
  "rotate halves" rope layout to llama.cpp's "rotate pairs" one). :func:`rope_row_order` gives the
  inverse row order, applied to dequantized weights and to 4-bit blocks alike: quantization blocks
  never cross rows, so permuting rows commutes with (de)quantization.

With ``keep_quant=True`` Q4_0 / Q4_1 matrices come back as ``pipo.ops.quant.QuantTensor`` built from
the raw blocks; everything else is dequantized to float32.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipo.errors import ModelFormatError
from pipo.io.spec import ModelSpec, compile_name_rules, match_name_rules
from pipo.io.tokenizer import Tokenizer, tokenizer_from_gguf
from pipo.ops.traits import complete_layout

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
_KEEPABLE_TYPES = ("Q4_0", "Q4_1")
# A kept Q4_0 / Q4_1 weight becomes a group-32 QuantTensor: per 32 values, 16 bytes of codes plus an
# fp16 scale and an fp16 min (Q4_0 gains a min, so both take 20 bytes).
_KEPT_NBYTES_PER_32 = 20
# What GGUFReader and numpy raise on a malformed or truncated file.
_READER_ERRORS = (ValueError, KeyError, IndexError, TypeError, OverflowError, UnicodeDecodeError, OSError)

_RULES = compile_name_rules(
    (
        (r"token_embd\.weight", "embed", "tok"),
        (r"blk\.(?P<i>\d+)\.attn_norm\.weight", "L{i}.attn", "norm_w"),
        (r"blk\.(?P<i>\d+)\.attn_(?P<p>q|k|v|output)\.(?P<k>weight|bias)", "L{i}.attn", "{k}{p}"),
        (r"blk\.(?P<i>\d+)\.ffn_norm\.weight", "L{i}.mlp", "norm_w"),
        (r"blk\.(?P<i>\d+)\.ffn_(?P<p>gate|up|down)\.weight", "L{i}.mlp", "w_{p}"),
        (r"output_norm\.weight", "head", "norm_w"),
        (r"output\.weight", "head", "w_out"),
    )
)


def rope_row_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Row indices undoing llama.cpp's q/k permutation: ``hf_rows = gguf_rows[order]``.

    Per head, llama.cpp stores row ``2*j + h`` of HF's ``h * half + j`` (h in {0, 1}, j < half).
    """
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, half, 2).transpose(0, 2, 1).reshape(-1)


def spec_from_gguf(meta: dict[str, Any], tensor_names: set[str], name: str = "") -> ModelSpec:
    """Spec of a llama-architecture GGUF from its metadata and tensor names."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFormatError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )

    def required(key: str) -> Any:
        """A scalar ``{arch}.{key}`` that must be present."""
        value = meta.get(f"{arch}.{key}")
        if value is None or isinstance(value, list):
            raise ModelFormatError(f"GGUF metadata lacks a scalar {arch}.{key}.")
        return value

    hidden, n_heads = int(required("embedding_length")), int(required("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // n_heads)
    _check_rope(meta, arch, head_dim, tensor_names)
    eos_ids = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot")]
    return ModelSpec(
        family="llama",
        vocab_size=int(meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())),
        hidden=hidden,
        n_layers=int(required("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or n_heads),
        head_dim=head_dim,
        ffn=int(required("feed_forward_length")),
        max_positions=int(required("context_length")),
        norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_ids=tuple(dict.fromkeys(int(i) for i in eos_ids if i is not None)),
        pad_id=meta.get("tokenizer.ggml.padding_token_id"),
        name=name or str(meta.get("general.name") or ""),
    )


def _check_rope(meta: dict[str, Any], arch: str, head_dim: int, tensor_names: set[str]) -> None:
    """Refuse rope variants we do not implement: partial rotary, scaled or per-frequency rope."""
    if int(meta.get(f"{arch}.rope.dimension_count") or head_dim) != head_dim:
        raise ModelFormatError("GGUF models with partial rotary embeddings are not supported.")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in tensor_names:
        raise ModelFormatError(
            "GGUF models with rope scaling (rope_freqs / rope.scaling) are not supported; "
            "use the Hugging Face safetensors checkpoint instead."
        )


class GGUFFile:
    """A :class:`~pipo.io.source.WeightSource` over one GGUF file (owns its memory map)."""

    def __init__(self, path: str | Path, keep_quant: bool = False) -> None:
        """Parse metadata and tensor index, check types and sizes; read no tensor data."""
        self.path = Path(path)
        self.keep_quant = keep_quant
        reader = _open_reader(self.path)
        meta = {key: _field_value(field) for key, field in reader.fields.items()}
        tensors = {t.name: t for t in reader.tensors}
        self.spec = spec_from_gguf(meta, set(tensors), name=self.path.stem)
        self.tokenizer: Tokenizer | None = tokenizer_from_gguf(meta) if "tokenizer.ggml.model" in meta else None
        self._reader = reader
        self._layout = self._build_layout(tensors)

    def _build_layout(self, tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """``{block: {canonical name: ReaderTensor}}``, complete for every block of the spec."""
        layout: dict[str, dict[str, Any]] = {block: {} for block in self.spec.block_names()}
        for gguf_name, tensor in tensors.items():
            target = match_name_rules(_RULES, gguf_name)
            if target is None or target[0] not in layout:
                continue
            if tensor.tensor_type.name not in SUPPORTED_TYPES:
                raise ModelFormatError(
                    f"{self.path}: tensor {gguf_name} has type {tensor.tensor_type.name}; "
                    f"supported types: {', '.join(SUPPORTED_TYPES)}."
                )
            layout[target[0]][target[1]] = tensor
        return complete_layout(self.spec, layout, self.path)

    def _kept_quant(self, tensor: Any, keep_quant: bool) -> bool:
        """Whether ``tensor`` is returned as a QuantTensor rather than dequantized."""
        return keep_quant and tensor.tensor_type.name in _KEEPABLE_TYPES and len(tensor.data.shape) == 2

    def block_nbytes(self, block: str, keep_quant: bool | None = None) -> int:
        """Bytes :meth:`read_block` returns: 4 per element, or the QuantTensor's bytes for kept weights."""
        keep = self.keep_quant if keep_quant is None else keep_quant
        return sum(
            int(t.n_elements) * _KEPT_NBYTES_PER_32 // 32 if self._kept_quant(t, keep) else int(t.n_elements) * 4
            for t in self._layout[block].values()
        )

    def read_block(self, block: str, keep_quant: bool | None = None) -> dict[str, Any]:
        """Canonical tensors of ``block``: float32 tensors, or QuantTensors for kept 4-bit weights."""
        keep = self.keep_quant if keep_quant is None else keep_quant
        return {name: self._read(name, tensor, keep) for name, tensor in self._layout[block].items()}

    def _read(self, name: str, tensor: Any, keep_quant: bool) -> Any:
        """One tensor, dequantized or kept, with q/k rows put back in HF order."""
        order = self._row_order(name, tensor)
        if self._kept_quant(tensor, keep_quant):
            return _quant_tensor(tensor, order)
        from gguf.quants import dequantize

        try:
            values = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        except _READER_ERRORS as err:
            raise ModelFormatError(f"{self.path}: cannot read tensor {tensor.name}: {err}") from None
        return values if order is None else values[torch.from_numpy(order)].contiguous()

    def _row_order(self, name: str, tensor: Any) -> np.ndarray | None:
        """The HF row order for q / k weights and biases, ``None`` for every other tensor."""
        if name not in ("wq", "bq", "wk", "bk"):
            return None
        n_heads = self.spec.n_heads if name in ("wq", "bq") else self.spec.n_kv_heads
        return rope_row_order(int(tensor.data.shape[0]), n_heads)


def _quant_tensor(tensor: Any, order: np.ndarray | None) -> Any:
    """A ``pipo.ops.quant.QuantTensor`` over the raw Q4_0 / Q4_1 blocks of ``tensor``."""
    from pipo.ops import quant

    build = quant.from_gguf_q4_0 if tensor.tensor_type.name == "Q4_0" else quant.from_gguf_q4_1
    shape = (int(tensor.shape[1]), int(tensor.shape[0]))  # GGUF dims are innermost-first
    try:
        qt = build(np.array(tensor.data, dtype=np.uint8), shape)
    except ValueError as err:  # e.g. rows not a multiple of 32 values, fp16 overflow of -8 * d
        raise ModelFormatError(f"tensor {tensor.name} cannot be kept as 4-bit: {err}") from None
    if order is None:
        return qt
    rows = torch.from_numpy(order)
    return dataclasses.replace(qt, **{f: getattr(qt, f)[rows].contiguous() for f in qt.tensor_fields})


def _open_reader(path: Path) -> Any:
    """``GGUFReader`` over ``path`` with every malformed-file error turned into ModelFormatError."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        size = path.stat().st_size
        for tensor in reader.tensors:
            if int(tensor.data_offset) + int(tensor.n_bytes) > size:
                raise ValueError(f"tensor {tensor.name} ends past the end of the file")
        return reader
    except FileNotFoundError:
        raise ModelFormatError(f"no such file or directory: {path}") from None
    except _READER_ERRORS as err:
        raise ModelFormatError(f"{path} is not a valid GGUF file (corrupt or truncated): {err}") from None


def _field_value(field: Any) -> Any:
    """Python value of a GGUF metadata field (str, number, bool or list)."""
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value
