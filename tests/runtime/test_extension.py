"""A new task kind runs beside the built-in ones, and docs/extending.md runs as written."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import pytest

from graphs.golden.regen import golden_graph, golden_spec
from pipo.runtime import LoadWeight, Runtime, Task, check_graph, graph_from_json, graph_to_json
from pipo.runtime.render import to_dot
from pipo.runtime.tasks import DISK
from tests.runtime.toy import ToyContext, assert_step_done, toy_executors

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


@dataclass(frozen=True, slots=True)
class Prefetch(Task):
    """Stage a block's weights from disk into pinned host memory before its LoadWeight."""

    block: str
    lane: str = field(default=DISK, kw_only=True)


def with_prefetch(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy of ``graph`` with a Prefetch before every LoadWeight (which now reads its output)."""
    extended = nx.DiGraph(graph)
    for name, data in graph.nodes(data=True):
        task = data["task"]
        if isinstance(task, LoadWeight):
            staged = ("pinned", task.block, task.block)
            prefetch = Prefetch(task.block)
            extended.add_node(prefetch.name, task=prefetch, reads=(), writes=(staged,),
                              order=data["order"] - 0.5)
            extended.add_edge(prefetch.name, name)
            extended.nodes[name]["reads"] = data["reads"] + (staged,)
    return extended


def _table():
    """The toy executors, plus Prefetch, plus a LoadWeight that insists on a prefetched block."""
    table = toy_executors().child()
    toy_load = table.lookup(LoadWeight)

    @table.register(Prefetch)
    async def prefetch(task, ctx):
        await asyncio.sleep(0.0005)  # async, on the event-loop `disk` lane
        ctx.staged.add(task.block)

    @table.register(LoadWeight)
    def load(task, ctx):
        assert task.block in ctx.staged, f"{task.name} before its Prefetch"
        toy_load(task, ctx)

    return table


def test_a_new_kind_runs_next_to_the_built_in_kinds():
    graph = with_prefetch(golden_graph("pipo", "decode"))
    table = _table()
    check_graph(graph, table)
    with Runtime(executors=table, trace=True) as runtime:
        program = runtime.compile(graph)
        for _ in range(3):
            ctx = ToyContext(golden_spec().block_names(), "decode", 0.0005)
            ctx.staged = set()
            stats = runtime.run(program, ctx)
            assert_step_done(ctx, n_micro=2)
    kinds = {r.name.partition("(")[0]: r.lane for r in stats.records}
    assert kinds == {"Prefetch": DISK, "LoadWeight": "load_weight", "Compute": "compute",
                     "LoadKV": "load_kv", "SaveKV": "save_kv"}
    start = {r.name: r.start_s for r in stats.records}
    assert start["Prefetch(L1.mlp)"] < start["LoadWeight(L1.mlp,0)"]


def test_a_new_kind_survives_json_and_rendering():
    graph = with_prefetch(golden_graph("sequential", "prefill"))
    back = graph_from_json(json.loads(json.dumps(graph_to_json(graph))))
    assert back.nodes["Prefetch(embed)"]["task"] == Prefetch("embed")
    check_graph(back)
    assert '"Prefetch(head)" -> "LoadWeight(head,1)";' in to_dot(back)


def test_compile_refuses_a_new_kind_nobody_registered():
    graph = with_prefetch(golden_graph("pipo", "prefill"))
    with Runtime(executors=toy_executors()) as runtime:
        with pytest.raises(ValueError, match="no executor registered for task kind Prefetch"):
            runtime.compile(graph)


def test_the_extending_doc_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/extending.md should hold exactly one python block"
    module = types.ModuleType("docs_extending_example")
    sys.modules[module.__name__] = module
    try:
        exec(compile(blocks[0], str(DOC), "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    assert module.ctx.done == ["L0.attn"]
    assert {r.lane for r in module.stats.records} == {"load_weight", "verify", "compute"}
    assert "verify" in capsys.readouterr().out
    module.ctx.store["L0.attn"] = b"flipped bits"
    with Runtime(executors=module.table) as runtime:
        with pytest.raises(ValueError, match="L0.attn is corrupt in weight slot 0"):
            runtime.run(module.builder.graph, module.ctx)
