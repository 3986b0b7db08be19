"""The ``pipo`` schedule: fine-grained tasks overlapped on four lanes, no barriers.

- Sub-layer blocks: each layer is an attention block and an MLP block, each loaded separately.
- Weights of a block are loaded once per step and reused by every micro-batch (zig-zag order).
- Look-ahead: a block's load starts as soon as one of ``plan.n_weight_slots`` slots is free, i.e.
  up to ``n_weight_slots - 1`` blocks ahead of compute.
- KV: the cache of (layer, micro-batch) loads beside the weight loads into one of
  ``plan.n_kv_slots`` slots; its save runs beside the following compute (the next MLP).
Only dataflow and slot-reuse edges order tasks; the scheduler's critical-path priority does the rest.
"""

from __future__ import annotations

import networkx as nx

from graphs.common import StepEmitter, attn_layer
from pipo.io.spec import ModelSpec
from pipo.plan import Plan


def build(spec: ModelSpec, plan: Plan, phase: str) -> nx.DiGraph:
    """The overlapped step graph of ``phase``."""
    em = StepEmitter(spec, plan, phase)
    for block in em.blocks:
        em.load_weight(block)
        layer = attn_layer(block)
        for micro in range(plan.n_micro):
            if layer is not None:
                em.load_kv(layer, micro)
            em.compute(block, micro)
            if layer is not None:
                em.save_kv(layer, micro)
    return em.graph
