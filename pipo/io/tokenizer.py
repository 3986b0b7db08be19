"""Text <-> token ids, incremental decoding and chat templates.

:class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` built from one of two places:

* an HF directory (:func:`tokenizer_from_hf_dir`): ``tokenizer.json`` plus ``tokenizer_config.json``
  (special tokens, ``add_bos_token``, chat template; ``chat_template.jinja`` if present);
* GGUF metadata (:func:`tokenizer_from_gguf`): llama.cpp stores a GPT-2 style byte-level BPE as
  ``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` and names the pre-tokenizer regex in
  ``tokenizer.ggml.pre``. We rebuild the same pipeline: BPE model, the split named by ``pre``
  (:data:`PRE_TOKENIZER_SPLITS`, llama.cpp's table), byte-level mapping, control tokens as specials.

Encoding never lets the backend add specials: BOS is prepended by :meth:`Tokenizer.encode` alone,
so callers control it. Chat templates render in a sandboxed jinja2 environment configured as
transformers does (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from pipo.errors import ModelFormatError

if TYPE_CHECKING:
    from pipo.io.spec import ModelSpec

# llama.cpp's pre-tokenizer splits by ``tokenizer.ggml.pre``; each runs before the byte-level mapping.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT = r"\p{N}"  # each digit alone (StarCoder-style vocabularies), then GPT-2's regex
# name -> (regex split run first, or None; whether GPT-2's own regex runs after it)
PRE_TOKENIZER_SPLITS: dict[str, tuple[str | None, bool]] = {
    "default": (None, True), "gpt2": (None, True), "gpt-2": (None, True),
    "smollm": (_DIGIT, True), "starcoder": (_DIGIT, True), "refact": (_DIGIT, True),
    "llama3": (_LLAMA3_SPLIT, False), "llama-v3": (_LLAMA3_SPLIT, False), "llama-bpe": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False),
}  # fmt: skip
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token_type values
_EXTRA_EOS_KEY = "pipo_eos_token_ids"  # tokenizer_config.json key: every EOS id, not just eos_token


class Tokenizer:
    """Encode/decode text for one model; owns the ``tokenizers`` backend and the chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_ids: Iterable[int],
        add_bos: bool,
        chat_template: str | None = None,
    ) -> None:
        """Wrap ``backend``; ``add_bos`` is the default of :meth:`encode`."""
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.add_bos = add_bos
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | Path, spec: ModelSpec | None = None) -> Tokenizer:
        """Load from an HF-layout directory (see :func:`tokenizer_from_hf_dir`)."""
        return tokenizer_from_hf_dir(path, spec)

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` + ``tokenizer_config.json`` so :meth:`from_dir` restores this tokenizer."""
        directory = Path(directory)
        (directory / "tokenizer.json").write_text(self.backend.to_str(), encoding="utf-8")
        config = {
            "bos_token": self._token_or_none(self.bos_id),
            "eos_token": self._token_or_none(self.eos_ids[0] if self.eos_ids else None),
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
            _EXTRA_EOS_KEY: list(self.eos_ids),
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; prepend BOS when ``add_bos`` (default: the model's convention)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; incomplete UTF-8 sequences decode to U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental decoder bound to this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}]``) with the model's chat template."""
        if not self.chat_template:
            raise ModelFormatError("this model has no chat template; pass a plain prompt instead.")
        return _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_or_none(self.bos_id),
            eos_token=self._token_or_none(self.eos_ids[0] if self.eos_ids else None),
        )

    def _token_or_none(self, token_id: int | None) -> str | None:
        """Text of a special token id, ``None`` when absent."""
        return None if token_id is None else self.backend.id_to_token(token_id)


class StreamDecoder:
    """Turns a stream of ids into text pieces without ever splitting a UTF-8 character.

    Keeps a small window ``ids[prefix:]``: text is emitted only when decoding the window yields more
    than decoding ``ids[prefix:read]`` and does not end in U+FFFD (a character still missing bytes).
    Decoding a window rather than single ids also keeps decoders that strip a leading space
    (sentencepiece) correct. A genuine trailing U+FFFD is held back until more ids or :meth:`flush`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        """Start with no ids."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def feed(self, ids: int | Iterable[int]) -> str:
        """Append ``ids`` (one id or many); return the text they completed (maybe ``""``)."""
        self._ids.extend([ids] if isinstance(ids, int) else ids)
        before = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        after = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Return whatever is still held back (incomplete bytes become U+FFFD) and reset."""
        before = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        after = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        self._ids, self._prefix, self._read = [], 0, 0
        return after[len(before) :]


@lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    """Compile a chat template in a sandbox, with the helpers HF chat templates expect."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        """Let a template reject its input (HF templates call this)."""
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
        """Plain JSON: jinja's own ``tojson`` escapes HTML characters, which templates do not expect."""
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kw)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@lru_cache(maxsize=1)
def _byte_spelling() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre == pre`` on a byte-level vocab.

    Names missing from :data:`PRE_TOKENIZER_SPLITS` get GPT-2's regex, as transformers does.
    """
    split, gpt2_regex = PRE_TOKENIZER_SPLITS.get(pre or "default", PRE_TOKENIZER_SPLITS["default"])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_regex)
    if split is None:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF describes (``meta``: metadata key -> decoded value).

    Only byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is supported.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelFormatError(f"GGUF tokenizer model {kind!r} is not supported; only 'gpt2' (byte-level BPE) is.")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    alphabet = set(_byte_spelling().values())
    spelled = [t if set(t) <= alphabet else "".join(_byte_spelling()[b] for b in t.encode()) for t in tokens]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
    backend = tokenizers.Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges, fuse_unk=False)
    )
    backend.pre_tokenizer = byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    _add_gguf_specials(backend, tokens, meta.get("tokenizer.ggml.token_type") or (), alphabet)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    return Tokenizer(
        backend,
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_ids=[i for i in (eos, eot) if i is not None],
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _add_gguf_specials(backend: tokenizers.Tokenizer, tokens: list[str], types: Iterable[int], alphabet: set) -> None:
    """Register control tokens as specials and user-defined ones as added tokens (kept whole).

    A control token spelled outside the byte alphabet is a llama.cpp mislabel and is skipped, as
    transformers does: adding it would grow the vocabulary beyond the model's.
    """
    control, user = [], []
    for token, kind in zip(tokens, types):
        if kind == _CONTROL and set(token) <= alphabet:
            control.append(AddedToken(token, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            user.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def tokenizer_from_hf_dir(path: str | Path, spec: ModelSpec | None = None) -> Tokenizer:
    """Load ``tokenizer.json`` (+ ``tokenizer_config.json``) from an HF model directory.

    EOS ids are the config's ``eos_token`` plus ``spec.eos_ids``; BOS is prepended by default when
    ``add_bos_token`` says so, or, when the config is silent, when ``tokenizer.json``'s
    post-processor adds it.
    """
    path = Path(path)
    try:
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except Exception as err:  # tokenizers raises a bare Exception for unreadable files
        raise ModelFormatError(f"{path}/tokenizer.json cannot be loaded: {err}") from None
    bos_id = _special_id(backend, config.get("bos_token"))
    if bos_id is None and spec is not None:
        bos_id = spec.bos_id
    eos_id = _special_id(backend, config.get("eos_token"))
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_ids=[
            *([eos_id] if eos_id is not None else []),
            *config.get(_EXTRA_EOS_KEY, ()),
            *(spec.eos_ids if spec else ()),
        ],
        add_bos=bool(add_bos),
        chat_template=_chat_template(path, config),
    )


def _special_id(backend: tokenizers.Tokenizer, token: Any) -> int | None:
    """Id of a special token given as a string or as ``{"content": ...}``."""
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """The chat template: ``chat_template.jinja`` if present, else the config's (default entry)."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template
