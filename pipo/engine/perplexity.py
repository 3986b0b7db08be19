"""Perplexity of a text: logits at every position, over sliding windows (the quality guard).

Windows of ``window`` tokens start every ``stride`` tokens (Hugging Face's "perplexity of
fixed-length models" recipe): each window is one step of a one-row batch of the engine
(:meth:`Engine.open_batch`) with the head applied to every position; a window scores only the tokens the previous one did not (its
last ``end - previous end``), each from at least ``window - stride`` tokens of context. Token 0 is
never scored (nothing predicts it), so a text of ``n`` tokens scores ``n - 1``. The result is
``exp(mean negative log-likelihood)``, summed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipo.engine.engine import Engine
from pipo.errors import GenerationError

DEFAULT_WINDOW = 1024
DEFAULT_STRIDE = 512


@dataclass(frozen=True)
class Perplexity:
    """``perplexity`` of ``n_tokens`` text tokens (``n_scored`` of them predicted), its mean
    negative log-likelihood ``nll`` (nats per token) and the ``window`` / ``stride`` it used."""

    perplexity: float
    nll: float
    n_tokens: int
    n_scored: int
    window: int
    stride: int


def window_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """fp32 logits ``[len(ids), vocab]`` at every position of ``ids`` (one prefill, no cache kept)."""
    engine._check_request([ids], 1)
    with engine.open_batch(rows=1, max_len=len(ids)) as batch:
        row = batch.admit()
        return batch.step({row: ids}, logits="all")[row]  # [t, vocab]


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first scored index inside the window)`` of each window over ``n_tokens``."""
    out, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        out.append((begin, end, max(1, previous_end - begin)))
        previous_end = end
        if end == n_tokens:
            break
    return out


def perplexity(engine: Engine, ids: list[int], *, window: int = DEFAULT_WINDOW,
               stride: int = DEFAULT_STRIDE) -> Perplexity:
    """The perplexity of token ids ``ids`` under ``engine``'s model (see the module doc)."""
    if len(ids) < 2:
        raise GenerationError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    if not 1 <= stride <= window:
        raise GenerationError(f"--stride must be between 1 and --window ({window}), got {stride}")
    total, count = 0.0, 0
    for begin, end, first in windows(len(ids), window, stride):
        logits = window_logits(engine, ids[begin:end])  # [L, vocab]
        targets = torch.tensor(ids[begin + first:end])  # [L - first]
        logp = torch.log_softmax(logits[first - 1:-1].double(), dim=-1)  # [L - first, vocab]
        total -= float(logp.gather(1, targets[:, None]).sum())
        count += len(targets)
    nll = total / count
    return Perplexity(float(torch.tensor(nll).exp()), nll, len(ids), count, window, stride)
