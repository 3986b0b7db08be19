"""The generation loop of ``Engine.generate_ids``: a thin user of a :class:`~pipo.engine.batch.Batch`.

Step 0 feeds every prompt as its row's tokens (one pass, no padding between rows); each later step
feeds each live row its sampled token. A row that produced eos is freed and leaves the passes. The
next step's leading loads are started (``Batch.prefetch``) before the host waits for the logits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipo.engine.batch import Batch
from pipo.ops.sampling import SamplingParams, make_generator, sample
from pipo.plan import Plan
from pipo.runtime.scheduler import RunStats


@dataclass
class Generation:
    """Result of ``Engine.generate_ids``: new tokens per prompt (eos excluded) and timings.

    ``logits`` (with ``keep_logits``): per step [batch, vocab], NaN for rows that had ended.
    """

    tokens: list[list[int]]
    plan: Plan
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)
    step_stats: list[RunStats] = field(default_factory=list)


def decode_loop(batch: Batch, prompts: list[list[int]], max_new_tokens: int,
                sampling: SamplingParams, eos: set[int], *, keep_logits: bool = False,
                on_step: Callable[[list[int | None]], None] | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after each prompt, one row of ``batch`` each."""
    rows = [batch.admit() for _ in prompts]
    feed = dict(zip(rows, prompts))
    generator = make_generator(sampling)
    result = Generation(tokens=[[] for _ in prompts], plan=batch.plan)
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        wait = batch.submit(feed)
        if step + 1 < max_new_tokens:  # the next step's leading loads go ahead now
            batch.prefetch({row: 1 for row in feed})
        out = wait()
        live = sorted(feed)
        next_ids = sample(torch.cat([out[row] for row in live]), sampling, generator).tolist()
        elapsed = time.perf_counter() - t0
        if step == 0:
            result.prefill_s = elapsed
        else:
            result.decode_s += elapsed
        result.steps += 1
        if keep_logits:
            result.logits.append(_full_logits(out, len(prompts)))
        fresh: list[int | None] = [None] * len(prompts)
        feed = {}
        for row, token in zip(live, next_ids):
            if token in eos:
                batch.free(row)
                continue
            result.tokens[row].append(token)
            fresh[row], feed[row] = token, [token]
        if on_step is not None:
            on_step(fresh)
        if not feed:
            break
    result.step_stats = batch.stats
    return result


def _full_logits(out: dict[int, torch.Tensor], n_rows: int) -> torch.Tensor:
    """[n_rows, vocab] logits of one step, NaN for rows not in it."""
    first = next(iter(out.values()))
    full = torch.full((n_rows, first.shape[-1]), math.nan, dtype=first.dtype)
    for row, logits in out.items():
        full[row] = logits[-1]
    return full
