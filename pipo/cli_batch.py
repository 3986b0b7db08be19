"""``pipo generate --input FILE --output FILE``: a JSONL file of prompts, batched.

Every line is checked before the first token is generated: valid JSON with a string ``prompt``, a
prompt that is not empty and fits the model's context together with ``-n`` new tokens, and a plan
for every batch, so a bad line (named ``file:line``) never aborts a run half way.

Finished batches are appended to ``OUTPUT.partial`` (flushed and fsynced per batch); once every
batch is done the file is renamed to ``OUTPUT``. So ``OUTPUT`` only ever holds a complete result. An
interrupted or failed run leaves ``OUTPUT.partial`` with the whole lines of the batches that
finished (and says so); it is removed when no batch finished.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pipo.cli_options import check
from pipo.errors import PipoError


@dataclass(frozen=True)
class PromptLine:
    """One record of the input file and the line it came from."""

    line: int
    record: dict

    @property
    def prompt(self) -> str:
        """The record's prompt text."""
        return self.record["prompt"]


def read_prompts(path: Path) -> list[PromptLine]:
    """Records of a JSONL prompt file; each line an object with a string ``prompt``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PipoError(f"no such input file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipoError(f"cannot read {path}: {exc}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipoError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise PipoError(f"{path}:{number}: expected an object with a string \"prompt\"")
        records.append(PromptLine(number, record))
    check(bool(records), f"{path} holds no prompts")
    return records


def check_prompts(engine, args, prompts: list[PromptLine]) -> None:
    """Tokenize every prompt and plan every batch; refuse the first bad line by ``file:line``."""
    lengths = []
    for p in prompts:
        try:
            lengths.append(prompt_tokens(engine, p.prompt, args))
        except PipoError as exc:
            raise PipoError(f"{args.input}:{p.line}: {exc}") from None
    for start in range(0, len(lengths), args.batch_size):
        batch = lengths[start:start + args.batch_size]
        engine.plan_for(len(batch), max(batch) + args.max_new_tokens)


def prompt_tokens(engine, prompt: str, args) -> int:
    """Token count of ``prompt``; PipoError saying why it cannot be generated with ``args``
    (its ``max_new_tokens``, ``chat``, ``system``)."""
    from pipo.engine.text import encode_prompt

    spec = engine.spec
    limit = min(spec.max_positions, spec.sliding_window or spec.max_positions)
    what = "context" if limit == spec.max_positions else "sliding attention window"
    check(prompt != "", "the prompt is empty")
    n_tokens = len(encode_prompt(engine, prompt, args.chat, args.system))
    check(n_tokens + args.max_new_tokens <= limit,
          f"the prompt is {n_tokens} tokens; with -n {args.max_new_tokens} new tokens "
          f"that exceeds the model's {what} of {limit} tokens (shorten it or lower -n)")
    return n_tokens


def run_batch(engine, args, sampling, prompts: list[PromptLine]) -> int:
    """Generate every prompt's completion, batch by batch, into ``args.output``."""
    from tqdm import tqdm

    check_prompts(engine, args, prompts)
    output = PartialOutput(args.output, len(prompts))
    with output, tqdm(total=len(prompts), unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start:start + args.batch_size]
            texts = engine.generate([p.prompt for p in batch], args.max_new_tokens, sampling,
                                    chat=args.chat, system=args.system)
            output.append([{**p.record, "completion": t} for p, t in zip(batch, texts)])
            bar.update(len(batch))
    return 0


class PartialOutput:
    """JSONL records appended to ``PATH.partial`` batch by batch, renamed to ``PATH`` on success.

    Leaving the ``with`` block by an exception keeps the partial file when it holds finished
    records (and notes that on the exception), and removes it when it holds none.
    """

    def __init__(self, path: Path, expected: int):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.expected = expected
        self.written = 0
        self._file = None

    def __enter__(self) -> PartialOutput:
        self._file = open(self.partial, "w", encoding="utf-8")
        return self

    def append(self, records: list[dict]) -> None:
        """Write whole lines for ``records`` and make them durable before returning."""
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.written += len(records)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc is None:
            os.replace(self.partial, self.path)
            return
        if not self.written:
            self.partial.unlink(missing_ok=True)
            return
        kept = f"{self.written} of {self.expected} completions kept in {self.partial}"
        if isinstance(exc, PipoError):
            raise PipoError(f"{exc.for_cli()} ({kept})") from exc
        exc.add_note(kept)
