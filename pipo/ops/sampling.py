"""Choosing the next token from logits: greedy, or temperature + top-k + top-p (nucleus) sampling.

Reproducibility: random draws come from a ``torch.Generator`` made by :func:`make_generator` from
``SamplingParams.seed`` (a CPU generator by default). The probabilities are moved to the generator's
device for the draw, so the same seed draws the same tokens whether the logits live on CPU or GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipo.errors import GenerationError


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy (argmax); the other fields then do nothing.

    top_k: keep only the k most likely tokens (0 = no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0 = all).
    seed: seeds the generator; ``None`` draws a fresh random seed.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        """Raise :class:`GenerationError` with one clear sentence if any value is out of range."""
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise GenerationError(
                f"Temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 means no limit), got {self.top_k!r}.")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] (1 means no limit), got {self.top_p!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise GenerationError(f"Seed must be an integer >= 0 or unset, got {self.seed!r}.")

    @property
    def greedy(self) -> bool:
        """True when tokens are chosen by argmax."""
        return self.temperature == 0


def make_generator(params: SamplingParams, device="cpu") -> torch.Generator:
    """A generator seeded with ``params.seed`` (or a random seed when it is ``None``)."""
    params.validate()
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [b] (int64, on logits' device) from logits [b, vocab]."""
    params.validate()
    if params.greedy:
        return logits.argmax(dim=-1)                                   # [b]
    probs = probabilities(logits, params)                              # [b, V]
    draw_device = generator.device if generator is not None else probs.device
    ids = torch.multinomial(probs.to(draw_device), 1, generator=generator)  # [b, 1]
    return ids.squeeze(-1).to(logits.device)                           # [b]


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution :func:`sample` draws from (temperature, top-k, top-p): [b, V] fp32.

    Not for greedy params (temperature 0 has no distribution; use argmax)."""
    scaled = logits.float() / params.temperature                       # [b, V]
    if 0 < params.top_k < scaled.shape[-1]:
        scaled = _keep_top_k(scaled, params.top_k)                     # [b, V]
    if params.top_p < 1:
        scaled = _keep_top_p(scaled, params.top_p)                     # [b, V]
    return scaled.softmax(dim=-1)                                      # [b, V]


def _keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest logits of each row to -inf: [b, V] -> [b, V]."""
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]                 # [b, 1]
    return logits.masked_fill(logits < kth, -math.inf)                 # [b, V]


def _keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep each row's smallest most-likely set with probability >= top_p, -inf elsewhere: [b, V]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)        # [b, V] each
    probs = sorted_logits.softmax(dim=-1)                              # [b, V]
    mass_before = probs.cumsum(dim=-1) - probs                         # [b, V] mass of better tokens
    drop = mass_before >= top_p                                        # [b, V]; the best is never dropped
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)         # [b, V]
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)  # [b, V]
