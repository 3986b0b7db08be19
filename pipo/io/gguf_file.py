"""Block-by-block reads of a llama.cpp GGUF file (llama architecture).

The file is parsed once by :mod:`pipo.io.gguf_parse` (a private memory map: metadata is decoded,
tensor data is not read). Tensors of type F32, F16, Q8_0, Q4_0 and Q4_1 are supported; any other type
is refused when opening, naming the type, so a model never fails halfway through a run.

Two llama.cpp conventions are undone so our weights equal Hugging Face's:

* GGUF lists dims innermost-first; :class:`~pipo.io.gguf_parse.GGUFTensorInfo` shapes are torch order.
* ``convert_hf_to_gguf.py`` permutes the rows of ``attn_q`` / ``attn_k`` (per head, from HF's
  "rotate halves" rope layout to llama.cpp's "rotate pairs" one). :func:`rope_row_order` gives the
  inverse row order, applied to dequantized weights and to quantized blocks alike: quantization blocks
  never cross rows, so permuting rows commutes with (de)quantization.

By default (``keep_quant=True``) tensors come back as stored: Q4_0 / Q4_1 matrices as
``pipo.ops.quant.QuantTensor`` (bit-exact), Q8_0 matrices as :class:`pipo.io.q8.Q8Tensor`, F16 as
fp16; placement decides what to compute on. ``keep_quant=False`` dequantizes everything to float32,
vectorized over whole tensors (the same values as ``gguf.quants``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipo.errors import ModelFormatError
from pipo.io.gguf_parse import GGUFTensorInfo, parse_gguf
from pipo.io.progress import LoadProgress
from pipo.io.q8 import from_gguf_q8_0, to_dense
from pipo.io.spec import ModelSpec, block_layer, compile_name_rules, match_name_rules
from pipo.io.tokenizer import Tokenizer, tokenizer_from_gguf
from pipo.ops import quant
from pipo.ops.traits import complete_layout

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
# Bytes per 32 values of what read_block returns, by kept type (None: dequantized to float32). A kept
# Q4_0 / Q4_1 weight is a group-32 QuantTensor: 16 bytes of codes plus an fp16 scale and min (Q4_0
# gains a min); a Q8_0 one keeps its 32 int8 codes and fp16 scale.
_KEPT_NBYTES_PER_32 = {None: 128, "F16": 64, "Q4_0": 20, "Q4_1": 20, "Q8_0": 34}
# Per quantized type: bytes per block, and how many fp16 scale fields lead each block.
_SCALE_LAYOUT = {"Q4_0": (18, 1), "Q4_1": (20, 2), "Q8_0": (34, 1)}
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16}
_BUILDERS = {"Q4_0": quant.from_gguf_q4_0, "Q4_1": quant.from_gguf_q4_1, "Q8_0": from_gguf_q8_0}

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

    def __init__(self, path: str | Path, keep_quant: bool = True) -> None:
        """Parse metadata and tensor index, check types and sizes; read no tensor data."""
        self.path = Path(path)
        self.keep_quant = keep_quant
        contents = parse_gguf(self.path)
        meta = contents.meta
        self.spec = spec_from_gguf(meta, set(contents.tensors), name=self.path.stem)
        self.tokenizer: Tokenizer | None = tokenizer_from_gguf(meta) if "tokenizer.ggml.model" in meta else None
        self._layout = self._build_layout(contents.tensors)
        self._progress = LoadProgress(self.spec.name, self.spec.block_names())

    def _build_layout(self, tensors: dict[str, GGUFTensorInfo]) -> dict[str, dict[str, GGUFTensorInfo]]:
        """``{block: {canonical name: tensor info}}``, complete for every block of the spec."""
        layout: dict[str, dict[str, Any]] = {block: {} for block in self.spec.block_names()}
        for gguf_name, tensor in tensors.items():
            target = match_name_rules(_RULES, gguf_name)
            if target is None or target[0] not in layout:
                continue
            if tensor.type_name not in SUPPORTED_TYPES:
                raise ModelFormatError(
                    f"{self.path}: tensor {gguf_name} has type {tensor.type_name}; "
                    f"supported types: {', '.join(SUPPORTED_TYPES)}."
                )
            layout[target[0]][target[1]] = tensor
        return complete_layout(self.spec, layout, self.path)

    def _kept_type(self, tensor: GGUFTensorInfo, keep_quant: bool) -> str | None:
        """The stored type ``tensor`` is returned in (Q4_0, Q4_1, Q8_0, F16), ``None`` if float32."""
        if not keep_quant or tensor.type_name == "F32":
            return None
        if tensor.type_name == "F16" or len(tensor.shape) == 2:
            return tensor.type_name
        return None

    @property
    def kept_int4_group(self) -> int | None:
        """32 when the layers' linear weights come back as 4-bit records (Q4_0 / Q4_1 kept),
        else ``None``: what an engine's default ``weights="auto"`` may compute on."""
        if not self.keep_quant:
            return None
        layers = [t for block, tensors in self._layout.items() if block_layer(block) is not None
                  for t in tensors.values() if len(t.shape) == 2]
        int4 = bool(layers) and all(t.type_name in ("Q4_0", "Q4_1") for t in layers)
        return quant.GGUF_BLOCK if int4 else None

    @property
    def kept_q8_names(self) -> frozenset[str]:
        """The embedding / head tensors (``tok``, ``w_out``) that come back as Q8_0 records."""
        if not self.keep_quant:
            return frozenset()
        return frozenset(name for block in ("embed", "head") for name, t in self._layout[block].items()
                         if name in ("tok", "w_out") and self._kept_type(t, True) == "Q8_0")

    def block_nbytes(self, block: str, keep_quant: bool | None = None) -> int:
        """Bytes :meth:`read_block` returns: 4 per value, or the kept record's bytes."""
        keep = self.keep_quant if keep_quant is None else keep_quant
        return sum(
            t.n_elements * _KEPT_NBYTES_PER_32[self._kept_type(t, keep)] // 32 for t in self._layout[block].values()
        )

    def read_block(self, block: str, keep_quant: bool | None = None) -> dict[str, Any]:
        """Canonical tensors of ``block``: kept records (QuantTensor, Q8Tensor, fp16) or float32 tensors.

        Every tensor's scales (or values) are checked to be finite: a corrupt file is a ModelFormatError
        naming the tensor, never NaN weights.
        """
        keep = self.keep_quant if keep_quant is None else keep_quant
        tensors = {name: self._read(name, tensor, keep) for name, tensor in self._layout[block].items()}
        self._progress.done(block)
        return tensors

    def _read(self, name: str, tensor: GGUFTensorInfo, keep_quant: bool) -> Any:
        """One tensor, dequantized or kept, with q/k rows put back in HF order."""
        raw = tensor.raw()
        if not _finite(raw, tensor.type_name):
            raise ModelFormatError(
                f"{self.path}: tensor {tensor.name} holds NaN or infinite values; the file is corrupt."
            )
        order = self._row_order(name, tensor)
        if order is not None:  # whole rows of stored bytes: blocks never cross rows
            raw = raw.reshape(tensor.shape[0], -1)[order].reshape(raw.shape)
        try:
            return _decode(raw, tensor.type_name, tensor.shape, self._kept_type(tensor, keep_quant))
        except ValueError as err:  # e.g. fp16 overflow of -8 * d when keeping Q4_0
            raise ModelFormatError(f"{self.path}: cannot read tensor {tensor.name}: {err}") from None

    def _row_order(self, name: str, tensor: GGUFTensorInfo) -> np.ndarray | None:
        """The HF row order for q / k weights and biases, ``None`` for every other tensor."""
        if name not in ("wq", "bq", "wk", "bk"):
            return None
        n_heads = self.spec.n_heads if name in ("wq", "bq") else self.spec.n_kv_heads
        return rope_row_order(int(tensor.shape[0]), n_heads)


def _finite(raw: np.ndarray, type_name: str) -> bool:
    """Whether a tensor's floats are finite: its values (F32, F16) or its block scales (and mins)."""
    if type_name in _FLOAT_DTYPES:
        return bool(np.isfinite(raw.view(_FLOAT_DTYPES[type_name])).all())
    block_nbytes, n_floats = _SCALE_LAYOUT[type_name]
    blocks = raw.reshape(-1, block_nbytes)
    return bool(np.isfinite(np.ascontiguousarray(blocks[:, : 2 * n_floats]).view(np.float16)).all())


def _decode(raw: np.ndarray, type_name: str, shape: tuple[int, ...], kept: str | None) -> Any:
    """The tensor from its raw bytes: the kept record when ``kept``, else float32 (whole-tensor ops)."""
    if type_name in _FLOAT_DTYPES:
        values = torch.from_numpy(raw.view(_FLOAT_DTYPES[type_name]).reshape(shape))
        return values.float() if kept is None and type_name == "F16" else values.clone()
    matrix = shape if len(shape) == 2 else (1, shape[0])
    record = _BUILDERS[type_name](raw.reshape(matrix[0], -1), matrix)
    return record if kept else to_dense(record).reshape(shape)
