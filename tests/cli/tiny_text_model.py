"""A tiny random llama with a character-level tokenizer: fast text-in/text-out CLI tests.

The model is :func:`tests.e2e.conftest.build_model`'s (vocab 128); the tokenizer maps each
printable ASCII character to one id, so prompt lengths in tokens are lengths in characters.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.conftest import build_model

EOS = "</s>"


def build_text_model(path: Path) -> Path:
    """Write the model and its tokenizer into ``path``; return ``path``."""
    from tokenizers import Tokenizer, decoders, models

    build_model("llama", path)
    vocab = {EOS: 0, **{chr(c): c - 31 for c in range(32, 127)}}  # ids 1..95
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=" "))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([EOS])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return path
