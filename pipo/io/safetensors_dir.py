"""Lazy, block-by-block reads of a Hugging Face safetensors checkpoint directory.

A directory holds ``config.json`` and either one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Opening reads only headers: each shard's JSON header is parsed and
checked against the file size (so a truncated download is reported at open time, not mid-run), and
every HF parameter name is mapped to ``(block, canonical name)`` by the family's rule table below.
:meth:`SafetensorsDir.read_block` then reads one block's tensors through ``safetensors.safe_open``
handles kept per shard, and clones them: ``safe_open`` tensors are views of a memory map, and a
caller that times or pins a block must get real memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pipo.errors import ModelFormatError
from pipo.io.hf_config import load_spec
from pipo.io.progress import LoadProgress
from pipo.io.spec import ModelSpec, compile_name_rules, match_name_rules
from pipo.io.tokenizer import Tokenizer, tokenizer_from_hf_dir
from pipo.ops.traits import complete_layout

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPE_NBYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip

# (pattern after an optional "model." prefix, block template, name template): see
# :func:`pipo.io.spec.compile_name_rules` for how the named groups fill the templates.
_LLAMA_RULES = (
    (r"embed_tokens\.weight", "embed", "tok"),
    (r"layers\.(?P<i>\d+)\.self_attn\.(?P<p>[qkvo])_proj\.(?P<k>weight|bias)", "L{i}.attn", "{k}{p}"),
    (r"layers\.(?P<i>\d+)\.input_layernorm\.(?P<k>weight)", "L{i}.attn", "norm_{k}"),
    (r"layers\.(?P<i>\d+)\.post_attention_layernorm\.(?P<k>weight)", "L{i}.mlp", "norm_{k}"),
    (r"layers\.(?P<i>\d+)\.mlp\.(?P<p>gate|up|down)_proj\.(?P<k>weight|bias)", "L{i}.mlp", "{k}_{p}"),
    (r"norm\.(?P<k>weight)", "head", "norm_{k}"),
    (r"lm_head\.weight", "head", "w_out"),
)
_OPT_RULES = (
    (r"decoder\.embed_tokens\.weight", "embed", "tok"),
    (r"decoder\.embed_positions\.weight", "embed", "pos"),
    (r"decoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<p>q|k|v|out)_proj\.(?P<k>weight|bias)", "L{i}.attn", "{k}{p}"),
    (r"decoder\.layers\.(?P<i>\d+)\.self_attn_layer_norm\.(?P<k>weight|bias)", "L{i}.attn", "norm_{k}"),
    (r"decoder\.layers\.(?P<i>\d+)\.fc1\.(?P<k>weight|bias)", "L{i}.mlp", "{k}_up"),
    (r"decoder\.layers\.(?P<i>\d+)\.fc2\.(?P<k>weight|bias)", "L{i}.mlp", "{k}_down"),
    (r"decoder\.layers\.(?P<i>\d+)\.final_layer_norm\.(?P<k>weight|bias)", "L{i}.mlp", "norm_{k}"),
    (r"decoder\.final_layer_norm\.(?P<k>weight|bias)", "head", "norm_{k}"),
    (r"lm_head\.weight", "head", "w_out"),
)
_RULES = {"llama": _LLAMA_RULES, "mistral": _LLAMA_RULES, "qwen2": _LLAMA_RULES, "opt": _OPT_RULES}
_COMPILED = {family: compile_name_rules(rules, prefix=r"(?:model\.)?") for family, rules in _RULES.items()}


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """Where one tensor lives: its shard file, HF name, safetensors dtype and shape."""

    file: Path
    hf_name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor as stored (and as returned)."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count * _DTYPE_NBYTES[self.dtype]


def canonical_name(family: str, hf_name: str) -> tuple[str, str] | None:
    """``(block, canonical name)`` of an HF parameter name, ``None`` for names pipo does not use."""
    return match_name_rules(_COMPILED[family], hf_name)


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors header, checked against the file's size.

    Raises :class:`ModelFormatError` naming ``file`` when the header is not valid JSON, a dtype is
    unknown, or a tensor's ``data_offsets`` run past the end of the file (a truncated download).
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            header_nbytes = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_nbytes > size - 8:
                raise ModelFormatError(f"{file} is not a safetensors file (bad header length).")
            header = json.loads(handle.read(header_nbytes))
        return _check_header(file, header, size - 8 - header_nbytes)
    except FileNotFoundError:
        raise ModelFormatError(f"no such file or directory: {file}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{file} has a corrupt safetensors header: {err}") from None


def _check_header(file: Path, header: Any, data_nbytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate a parsed header against the data section size; return ``{name: (dtype, shape)}``."""
    if not isinstance(header, dict):
        raise ModelFormatError(f"{file} has a corrupt safetensors header (not a JSON object).")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            expected = _DTYPE_NBYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{file} has a corrupt safetensors header entry for {name!r}.") from None
        for dim in shape:
            expected *= dim
        if end - begin != expected or begin < 0:
            raise ModelFormatError(f"{file} has a corrupt safetensors header entry for {name!r}.")
        if end > data_nbytes:
            raise ModelFormatError(f"{file} is truncated: tensor {name!r} ends past the end of the file.")
        tensors[name] = (dtype, shape)
    return tensors


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the single file or the index's shards."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelFormatError(f"{index} is not a valid safetensors index: {err}") from None
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise ModelFormatError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}.")


class SafetensorsDir:
    """A :class:`~pipo.io.source.WeightSource` over an HF safetensors directory.

    Owns one ``safe_open`` handle per shard, opened on first use. Tensors come back in their stored
    dtype. With tied embeddings the head's ``w_out`` is the embedding matrix.
    """

    def __init__(self, path: str | Path, spec: ModelSpec | None = None) -> None:
        """Parse config and shard headers, map every tensor to its block; read no tensor data."""
        self.path = Path(path)
        self.spec = spec if spec is not None else load_spec(self.path)
        self._layout = self._build_layout()
        self._handles: dict[Path, Any] = {}
        has_tokenizer = (self.path / "tokenizer.json").is_file()
        self.tokenizer: Tokenizer | None = tokenizer_from_hf_dir(self.path, self.spec) if has_tokenizer else None
        self._progress = LoadProgress(self.spec.name or self.path.name, self.spec.block_names())

    def _build_layout(self) -> dict[str, dict[str, StoredTensor]]:
        """``{block: {canonical name: StoredTensor}}``, complete for every block of the spec."""
        layout: dict[str, dict[str, StoredTensor]] = {block: {} for block in self.spec.block_names()}
        for file in shard_files(self.path):
            for hf_name, (dtype, shape) in read_header(file).items():
                target = canonical_name(self.spec.family, hf_name)
                if target is not None and target[0] in layout:
                    layout[target[0]][target[1]] = StoredTensor(file, hf_name, dtype, shape)
        return complete_layout(self.spec, layout, self.path)

    def stored(self, block: str) -> dict[str, StoredTensor]:
        """Where each tensor of ``block`` is stored (no data read)."""
        return dict(self._layout[block])

    def block_nbytes(self, block: str) -> int:
        """Bytes of the tensors :meth:`read_block` returns for ``block`` (stored dtype)."""
        return sum(t.nbytes for t in self._layout[block].values())

    def read_block(self, block: str) -> dict[str, torch.Tensor]:
        """Read every tensor of ``block`` into fresh (non-mapped) CPU memory, in the stored dtype.

        A tensor holding NaN or infinite values is a ModelFormatError naming it (a corrupt file)."""
        out = {}
        for name, stored in self._layout[block].items():
            try:
                out[name] = self._handle(stored.file).get_tensor(stored.hf_name).clone()
            except SafetensorError as err:
                raise ModelFormatError(f"{stored.file}: cannot read {stored.hf_name!r}: {err}") from None
            if out[name].is_floating_point() and not bool(torch.isfinite(out[name]).all()):
                raise ModelFormatError(
                    f"{stored.file}: tensor {stored.hf_name} holds NaN or infinite values; the file is corrupt."
                )
        self._progress.done(block)
        return out

    def _handle(self, file: Path) -> Any:
        """The open ``safe_open`` handle of ``file`` (opened once)."""
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise ModelFormatError(f"{file} cannot be opened as safetensors: {err}") from None
        return handle
