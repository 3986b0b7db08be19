"""Draft steps in the verify pass's graph: chained compute tasks ahead of the embedding that no
load waits for, so the pass's leading loads run while the compute lane drafts."""

from __future__ import annotations

import networkx as nx
import pytest

from graphs import SCHEDULES, build_step
from graphs.golden.regen import golden_spec
from graphs.speculate import DraftStep, with_draft_steps
from pipo.plan import estimate_block_nbytes, fixed_plan
from pipo.runtime import (
    EXECUTORS,
    Compute,
    LoadKV,
    LoadWeight,
    ReadBlock,
    Runtime,
    check_graph,
)
from pipo.runtime.tasks import COMPUTE

SPEC = golden_spec()


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_draft_steps_precede_the_embedding_and_nothing_else_waits(schedule, tier):
    import pipo.engine.speculate_dag  # noqa: F401 - registers the DraftStep executor

    plan = fixed_plan(SPEC, estimate_block_nbytes(SPEC, 4), tier, batch=1, max_len=32,
                      kv_offload=True, schedule=schedule, n_kv_slots=3)
    base = build_step(SPEC, plan, "decode")
    graph = with_draft_steps(base, 3)
    check_graph(graph, EXECUTORS)
    drafts = [n for n, d in graph.nodes(data=True) if isinstance(d["task"], DraftStep)]
    assert len(drafts) == 3 and all(graph.nodes[n]["task"].lane == COMPUTE for n in drafts)
    assert nx.is_simple_path(graph, drafts)  # a chain, in index order
    embeds = [n for n, d in graph.nodes(data=True)
              if isinstance(d["task"], Compute) and d["task"].block == "embed"]
    assert embeds and all(graph.has_edge(drafts[-1], e) for e in embeds)
    loads = [n for n, d in graph.nodes(data=True)
             if isinstance(d["task"], (LoadWeight, ReadBlock, LoadKV))]
    for load in loads:  # a load waits for drafting only where it already waited for a compute
        if set(nx.ancestors(graph, load)) & set(drafts):
            assert any(isinstance(base.nodes[a]["task"], Compute) for a in nx.ancestors(base, load))
    with Runtime() as runtime:
        program = runtime.compile(graph)
    leading = {program.names[i] for i, inside in enumerate(program.in_prefix) if inside}
    assert leading and leading <= set(loads)  # the leading loads still start with the run
