"""The engine's batch of row slots for the scheduler: ``engine.open_batch`` (per-row KV).

Where the engine has no ``open_batch`` yet, :class:`RecomputeBatch` follows the same contract
without a KV cache: each step re-reads every listed row's whole history in one left-padded
``generate_ids`` call (one weight pass, one new token's logits per row). Its outputs are right,
its cost grows with the length of the rows: a stand-in, not continuous batching's speed.
"""

from __future__ import annotations

import torch

from pipo.errors import GenerationError


class BatchFull(GenerationError):
    """Every row slot is taken."""


def open_rows(engine, rows: int, max_len: int):
    """A batch of ``rows`` row slots of up to ``max_len`` tokens each on ``engine``."""
    if hasattr(engine, "open_batch"):
        return engine.open_batch(rows, max_len)
    return RecomputeBatch(engine, rows, max_len)


class RecomputeBatch:
    """Row slots without a KV cache (see the module docstring); ``logits="last"`` only."""

    def __init__(self, engine, rows: int, max_len: int):
        self.engine, self.rows, self.max_len = engine, rows, max_len
        self._tokens: dict[int, list[int]] = {}

    def admit(self, prompt_ids: list[int] | None = None) -> int:
        """Take a free slot with no tokens (feed the prompt with :meth:`step`)."""
        if prompt_ids:
            raise GenerationError("RecomputeBatch.admit takes no prompt: feed it with step()")
        row = next((r for r in range(self.rows) if r not in self._tokens), None)
        if row is None:
            raise BatchFull(f"all {self.rows} row slots are taken")
        self._tokens[row] = []
        return row

    def step(self, feed: dict[int, list[int]], logits: str = "last") -> dict[int, torch.Tensor]:
        """Append each row's tokens; the logits [1, vocab] after each listed row's last token."""
        if logits != "last":
            raise GenerationError("RecomputeBatch only gives the last token's logits")
        for row, tokens in feed.items():
            if len(self._tokens[row]) + len(tokens) > self.max_len:
                raise GenerationError(f"row {row} would pass max_len={self.max_len}")
        rows = list(feed)
        histories = [self._tokens[row] + list(feed[row]) for row in rows]
        result = self.engine.generate_ids(histories, 1, keep_logits=True)
        for row, history in zip(rows, histories):
            self._tokens[row] = history
        first = result.logits[0]                                   # [rows, vocab]
        return {row: first[i:i + 1] for i, row in enumerate(rows)}

    def length(self, row: int) -> int:
        """Tokens in the row."""
        return len(self._tokens[row])

    def truncate(self, row: int, length: int) -> None:
        """Drop the row's tokens from ``length`` on."""
        del self._tokens[row][length:]

    def free(self, row: int) -> None:
        """Free the slot at once."""
        self._tokens.pop(row, None)

    def close(self) -> None:
        """Free every slot."""
        self._tokens.clear()
