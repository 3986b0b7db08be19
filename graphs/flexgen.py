"""The ``flexgen`` schedule: FlexGen 0.1.8's overlap loop, reproduced in our runtime.

FlexGen walks (block j, micro-batch k) steps. In each step it starts loading block j+1's weights
(when k == 0), loads the KV cache of the next micro-batch, computes (j, k), saves the cache of the
previous micro-batch, and then synchronizes everything: a barrier after every step. The barrier is
why its GPU idles: a weight load overlaps only the first micro-batch's compute of a block.
"""

from __future__ import annotations

import networkx as nx

from graphs.common import DECODE, StepEmitter, attn_layer
from pipo.errors import PlanError
from pipo.io.spec import ModelSpec
from pipo.plan import RESIDENT, Plan


def build(spec: ModelSpec, plan: Plan, phase: str) -> nx.DiGraph:
    """The barrier-per-step graph of ``phase``."""
    _check_slots(plan, phase)
    em = StepEmitter(spec, plan, phase)
    barrier: list[str] = []
    loaded_kv: set[tuple[int, int]] = set()
    pending_save: tuple[int, int] | None = None
    blocks = em.blocks
    step = _collect(barrier)
    step(em.load_weight(blocks[0]))
    for j, block in enumerate(blocks):
        layer = attn_layer(block)
        for micro in range(plan.n_micro):
            if micro == 0 and j + 1 < len(blocks):
                step(em.load_weight(blocks[j + 1], after=barrier))
            if layer is not None:
                for k in (micro, micro + 1):
                    if k < plan.n_micro and (layer, k) not in loaded_kv:
                        loaded_kv.add((layer, k))
                        step(em.load_kv(layer, k, after=barrier))
            step(em.compute(block, micro, after=barrier))
            if pending_save is not None:
                step(em.save_kv(*pending_save, after=barrier))
            pending_save = (layer, micro) if layer is not None else None
            step(None, end=True)
    if pending_save is not None:
        step(em.save_kv(*pending_save, after=barrier))
    return em.graph


def _check_slots(plan: Plan, phase: str) -> None:
    """Each step keeps two weight slots busy (block j computes while j+1 loads) and, with an
    offloaded cache, three KV slots in decode (save m-1, compute m, load m+1), two in prefill."""
    tiers = [tier for _, tier in plan.placement]
    adjacent = any(a != RESIDENT and b != RESIDENT for a, b in zip(tiers, tiers[1:]))
    if adjacent and plan.n_weight_slots < 2:
        raise PlanError("the flexgen schedule needs at least 2 weight slots (it loads the next "
                        "block while this one computes); use --weight-slots 2")
    kv_slots = min(3 if phase == DECODE else 2, plan.n_micro)
    if plan.kv_offloaded and plan.n_kv_slots < kv_slots:
        raise PlanError(f"the flexgen schedule needs at least {kv_slots} KV slots with "
                        f"{plan.n_micro} micro-batches and an offloaded cache; "
                        f"use --kv-slots {kv_slots}")


def _collect(barrier: list[str]):
    """Returns ``step(name, end=False)``: gathers a step's tasks; ``end`` makes them the barrier."""
    current: list[str] = []

    def step(name: str | None, end: bool = False) -> None:
        if name is not None:
            current.append(name)
        if end and current:
            barrier[:] = current
            current.clear()

    return step
