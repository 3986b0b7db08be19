"""A batch of row slots that follows the per-row KV contract (docs/rows.md) without a model.

Each row's logits are a pure function of the row's own token history, so a request's tokens are the
same whatever else shares the batch: one-hot at ``next_token(history)``. ``POISON`` in a step's
tokens makes that step raise, to test how the scheduler fails a step.
"""

from __future__ import annotations

import torch

VOCAB = 50
POISON = 49


class BatchFull(Exception):
    """No free row slot."""


def next_token(history: list[int]) -> int:
    """The token this fake model predicts after ``history``."""
    return (sum(history) * 7 + len(history)) % (VOCAB - 2) + 1  # never 0 (eos) nor POISON


class FakeBatch:
    """``rows`` row slots of at most ``max_len`` tokens each; records every step's feed."""

    def __init__(self, rows: int, max_len: int):
        self.rows, self.max_len = rows, max_len
        self.history: dict[int, list[int]] = {}
        self.steps: list[dict[int, list[int]]] = []
        self.freed: list[int] = []

    def admit(self, prompt_ids: list[int] | None = None) -> int:
        free = [r for r in range(self.rows) if r not in self.history]
        if not free:
            raise BatchFull("no free row")
        assert not prompt_ids, "the scheduler feeds prompts through step"
        self.history[free[0]] = []
        return free[0]

    def step(self, feed: dict[int, list[int]], logits: str = "last") -> dict[int, torch.Tensor]:
        self.steps.append({row: list(tokens) for row, tokens in feed.items()})
        if any(POISON in tokens for tokens in feed.values()):
            raise RuntimeError("poisoned step")
        out = {}
        for row, tokens in feed.items():
            assert row in self.history and tokens, (row, tokens)
            hist = self.history[row]
            per_token = []
            for token in tokens:
                hist.append(token)
                assert len(hist) <= self.max_len
                one_hot = torch.zeros(VOCAB)
                one_hot[next_token(hist)] = 1.0
                per_token.append(one_hot)
            out[row] = torch.stack(per_token[-1:] if logits == "last" else per_token)
        return out

    def length(self, row: int) -> int:
        return len(self.history[row])

    def truncate(self, row: int, length: int) -> None:
        del self.history[row][length:]

    def free(self, row: int) -> None:
        del self.history[row]
        self.freed.append(row)

    def close(self) -> None:
        self.history.clear()


def alone(prompt: list[int], max_tokens: int, eos: int | None = None) -> list[int]:
    """The greedy tokens of ``prompt`` generated with nothing else in the batch."""
    hist, out = list(prompt), []
    while len(out) < max_tokens:
        token = next_token(hist)
        if token == eos:
            break
        out.append(token)
        hist.append(token)
    return out
