"""Drafting inside the verification pass: DraftStep tasks in the target's step DAG.

A round with a model draft runs as ONE target run whose graph is the verify step's graph plus k
:class:`~graphs.speculate.DraftStep` compute tasks ahead of the embedding
(:func:`graphs.speculate.with_draft_steps`). The pass's leading weight loads, disk reads and KV
loads do not wait for them, so the draft's k passes run on the compute lane while the target's
first blocks stream in (up to ``n_weight_slots`` blocks ahead, as in any step). The last
DraftStep hands the drafted tokens to the pass (``Batch.submit_prelude``).
"""

from __future__ import annotations

import asyncio
import time

from graphs import build_step
from graphs.speculate import DraftStep, with_draft_steps
from pipo.engine.engine import graph_key
from pipo.runtime.registry import executor


@executor(DraftStep)
def draft_step(task: DraftStep, ctx):
    """Draft token ``task.index`` of the round (see :class:`DraftRound`).

    On a CPU the compute and disk lanes share one event loop, and a disk read needs that loop to
    issue its chunks; so the step runs in a worker thread while the loop keeps the disk lane's reads
    going. On CUDA it runs inline (its kernels go to the compute lane's stream)."""
    if ctx.weights.device.type != "cpu":
        return ctx.prelude(task.index)
    return asyncio.get_running_loop().run_in_executor(None, ctx.prelude, task.index)


class DraftRound:
    """One round's draft steps: ``step(i)`` drafts token i; the last returns the pass's feed
    ``{row: [last committed token, drafts...]}``. ``draft_s`` sums the draft steps' seconds."""

    def __init__(self, draft, row: int, seq: list[int], token: int, k: int, sampling, generator):
        self.draft, self.row, self.seq, self.token, self.k = draft, row, seq, token, k
        self.sampling, self.generator = sampling, generator
        self.drafts: list[int] = []
        self.q = None
        self.draft_s = 0.0

    def step(self, index: int) -> dict[int, list[int]] | None:
        """Draft step ``index``; the feed after the last one, else ``None``."""
        t0 = time.perf_counter()
        if index == 0:
            self.draft.begin(self.seq, self.sampling, self.generator)
        self.draft.step_once()
        self.draft_s += time.perf_counter() - t0
        if index < self.k - 1:
            return None
        self.drafts, self.q = self.draft.result()
        return {self.row: [self.token, *self.drafts]}


class DraftPrograms:
    """Compiled verify-pass graphs with k draft steps, per (plan, phase, k), on ``engine``."""

    def __init__(self, engine):
        self.engine = engine
        self._programs: dict[tuple, object] = {}

    def get(self, plan, phase: str, k: int):
        """The compiled graph of ``phase`` for ``plan`` with ``k`` DraftSteps in front."""
        key = (graph_key(plan), phase, k)
        if key not in self._programs:
            graph = with_draft_steps(build_step(self.engine.spec, plan, phase), k)
            self._programs[key] = self.engine.runtime.compile(graph)
        return self._programs[key]


def verify_with_drafting(batch, programs: DraftPrograms, draft, row: int, seq: list[int],
                         token: int, k: int, sampling, generator):
    """One round in one run: (drafts, q, target logits [len(drafts)+1, V], draft seconds)."""
    round_ = DraftRound(draft, row, seq, token, k, sampling, generator)
    wait = batch.submit_prelude([row], "all", lambda phase: programs.get(batch.plan, phase, k),
                                round_)
    return round_.drafts, round_.q, wait()[row], round_.draft_s
