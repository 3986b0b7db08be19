"""The ``sequential`` schedule: one task at a time, nothing overlaps. The honest naive baseline.

Program order per block: load its weights, then for each micro-batch load KV, compute, save KV.
Every task waits for the one before it, whatever lane it runs on.
"""

from __future__ import annotations

import networkx as nx

from graphs.common import StepEmitter, attn_layer
from pipo.io.spec import ModelSpec
from pipo.plan import Plan


def build(spec: ModelSpec, plan: Plan, phase: str) -> nx.DiGraph:
    """The step graph of ``phase`` as a single chain of tasks."""
    em = StepEmitter(spec, plan, phase)
    last: list[str] = []

    def chain(name: str | None) -> None:
        if name is not None:
            last[:] = [name]

    for block in em.blocks:
        chain(em.load_weight(block, after=last))
        layer = attn_layer(block)
        for micro in range(plan.n_micro):
            if layer is not None:
                chain(em.load_kv(layer, micro, after=last))
            chain(em.compute(block, micro, after=last))
            if layer is not None:
                chain(em.save_kv(layer, micro, after=last))
    return em.graph
