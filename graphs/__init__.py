"""Schedules: pure builders ``build(spec, plan, phase) -> networkx.DiGraph``, one module each.

``sequential`` (no overlap), ``flexgen`` (FlexGen's loop with a barrier per step) and ``pipo``
(fine-grained, overlapped). All produce the same tokens; they differ only in ordering edges.
"""

from __future__ import annotations

import networkx as nx

from graphs import flexgen, pipo, sequential
from graphs.common import DECODE, PREFILL
from pipo.io.spec import ModelSpec
from pipo.plan import Plan

SCHEDULES = {"sequential": sequential.build, "flexgen": flexgen.build, "pipo": pipo.build}


def build_step(spec: ModelSpec, plan: Plan, phase: str) -> nx.DiGraph:
    """The step graph of ``phase`` ("prefill" or "decode") for ``plan.schedule``."""
    return SCHEDULES[plan.schedule](spec, plan, phase)


__all__ = ["DECODE", "PREFILL", "SCHEDULES", "build_step"]
