"""Draft steps inside the verification pass's step graph (speculative decoding, issue 12).

:func:`with_draft_steps` takes any schedule's step graph and adds ``k`` :class:`DraftStep` tasks
on the compute lane, chained, ahead of the first block's computes (the embedding reads the
drafted tokens). Nothing else waits for them: the pass's leading weight loads, disk reads and KV
loads start at once and run on their lanes while the compute lane drafts, so on a link-bound pass
the next round's drafting hides under the weight stream instead of adding to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from pipo.runtime.tasks import Compute, Task

DRAFT_SPACE = "draft"


@dataclass(frozen=True, slots=True)
class DraftStep(Task):
    """Draft token ``index`` of this round (index 0 also syncs the draft with the committed
    tokens); the last one hands the drafted tokens to the pass."""

    index: int

    def label(self) -> str:
        """``draft 2``."""
        return f"draft {self.index}"


def with_draft_steps(graph: nx.DiGraph, k: int) -> nx.DiGraph:
    """A copy of ``graph`` with ``k`` chained DraftSteps before its first block's computes."""
    out = graph.copy()
    first_order = min((d.get("order", 0) for _, d in out.nodes(data=True)), default=0)
    previous = None
    for i in range(k):
        task = DraftStep(i)
        reads = ((DRAFT_SPACE, 0, f"d{i - 1}"),) if previous else ()
        out.add_node(task.name, task=task, reads=reads, writes=((DRAFT_SPACE, 0, f"d{i}"),),
                     order=first_order - k + i)
        if previous is not None:
            out.add_edge(previous, task.name)
        previous = task.name
    if previous is None:
        return out
    computes = [(d.get("order", 0), d["task"].block) for _, d in graph.nodes(data=True)
                if isinstance(d["task"], Compute)]
    first_block = min(computes)[1]  # the embedding: the first block in program order
    for name, data in graph.nodes(data=True):
        if isinstance(data["task"], Compute) and data["task"].block == first_block:
            out.add_edge(previous, name)
    return out
