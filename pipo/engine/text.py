"""Text in, text out: prompts through the tokenizer (and chat template) into the engine."""

from __future__ import annotations

from typing import Callable

from pipo.engine.engine import Engine, Generation
from pipo.errors import GenerationError, ModelFormatError
from pipo.ops.sampling import SamplingParams


def encode_prompt(engine: Engine, prompt: str, chat: bool = False, system: str | None = None
                  ) -> list[int]:
    """Token ids of ``prompt``, wrapped in the model's chat template when ``chat``."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ModelFormatError("this model has no tokenizer; pass token ids to generate_ids()")
    if not isinstance(prompt, str):
        raise GenerationError(f"a prompt must be text, got {type(prompt).__name__}")
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages), add_bos=False)
    return tokenizer.encode(prompt)


def generate_text(engine: Engine, prompts: list[str], max_new_tokens: int = 64,
                  sampling: SamplingParams = SamplingParams(), *, chat: bool = False,
                  system: str | None = None,
                  on_text: Callable[[int, str], None] | None = None) -> tuple[list[str], Generation]:
    """Generate a completion for each prompt; ``on_text(row, piece)`` streams text as it decodes."""
    ids = [encode_prompt(engine, p, chat, system) for p in prompts]
    decoders = [engine.tokenizer.stream_decoder(skip_special_tokens=True) for _ in prompts]

    def on_step(fresh: list[int | None]) -> None:
        for row, token in enumerate(fresh):
            if token is not None and (piece := decoders[row].feed(token)):
                on_text(row, piece)

    result = engine.generate_ids(ids, max_new_tokens, sampling,
                                 on_step=on_step if on_text else None)
    if on_text:
        for row, decoder in enumerate(decoders):
            if tail := decoder.flush():
                on_text(row, tail)
    texts = [engine.tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    return texts, result


def complete(engine: Engine, prompts: str | list[str], max_new_tokens: int = 64,
             sampling: SamplingParams = SamplingParams(), *, chat: bool = False,
             system: str | None = None,
             on_text: Callable[[int, str], None] | None = None) -> str | list[str]:
    """The ``generate`` of an engine or a speculating wrapper: the completion of one prompt (a
    ``str``) or of each prompt of a list (:func:`generate_text`)."""
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    texts, _ = generate_text(engine, batch, max_new_tokens, sampling, chat=chat, system=system,
                             on_text=on_text)
    return texts[0] if isinstance(prompts, str) else texts
