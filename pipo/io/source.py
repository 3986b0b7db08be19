"""Open any model pipo can read, behind one protocol: :class:`WeightSource`.

:func:`open_model` looks at what a path is and picks the reader:

==============================================  ==============================================
path                                            reader
==============================================  ==============================================
``None`` or ``"default"``                       the default GGUF (:mod:`pipo.io.default_model`)
a ``.gguf`` file                                :class:`pipo.io.gguf_file.GGUFFile`
a directory with ``pipo-store.json``            :class:`pipo.io.store.OffloadStore`
a directory with ``config.json`` + safetensors  :class:`pipo.io.safetensors_dir.SafetensorsDir`
==============================================  ==============================================

Anything else is a :class:`~pipo.errors.ModelFormatError` saying what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pipo.errors import ModelFormatError
from pipo.io.spec import ModelSpec
from pipo.io.tokenizer import Tokenizer

STORE_INDEX_NAME = "pipo-store.json"


@runtime_checkable
class WeightSource(Protocol):
    """Where a model's weights come from, read one block at a time.

    Attributes: ``spec`` (the architecture), ``tokenizer`` (``None`` when the source has none),
    ``path`` (file or directory it reads). Block names and canonical tensor names are those of
    :mod:`pipo.io.spec`. Implementations own their open files; reading is synchronous.
    """

    spec: ModelSpec
    tokenizer: Tokenizer | None
    path: Path

    def read_block(self, block: str) -> dict[str, Any]:
        """Canonical tensors of ``block`` in fresh memory: ``torch.Tensor`` or ``QuantTensor``."""
        ...

    def block_nbytes(self, block: str) -> int:
        """Bytes of what :meth:`read_block` returns for ``block`` (as stored / returned)."""
        ...


def open_model(path: str | Path | None = None, *, keep_quant: bool = True) -> WeightSource:
    """Open the model at ``path`` (see the module table).

    ``keep_quant`` applies to GGUF files: by default their quantized blocks come back as stored
    (bit-exact records; placement or ``convert`` decide what to do with them); ``False`` dequantizes
    every tensor to float32 when read.
    """
    if path is None or str(path) == "default":
        from pipo.io.default_model import default_model_path

        path = default_model_path()
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"no such file or directory: {path}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from pipo.io.gguf_file import GGUFFile

            return GGUFFile(path, keep_quant=keep_quant)
        raise ModelFormatError(
            f"{path} is not a model: expected a .gguf file or a directory (Hugging Face safetensors "
            f"checkpoint or pipo store)."
        )
    return _open_directory(path)


def _open_directory(path: Path) -> WeightSource:
    """The reader for a model directory, or ModelFormatError saying what it should hold."""
    if (path / STORE_INDEX_NAME).is_file():
        from pipo.io.store import OffloadStore

        return OffloadStore(path)
    if (path / "config.json").is_file():
        from pipo.io.safetensors_dir import SafetensorsDir

        return SafetensorsDir(path)
    raise ModelFormatError(
        f"{path} is not a model directory: expected config.json with model.safetensors "
        f"(or model.safetensors.index.json), or a pipo store ({STORE_INDEX_NAME})."
    )
