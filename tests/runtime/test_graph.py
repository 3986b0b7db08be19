"""Graph tier: task records, the builder's dataflow edges, check_graph's invariants, JSON files.

No torch here (``tests/graphs/test_schedules.py`` proves these modules never import it).
"""

from __future__ import annotations

import json

import networkx as nx
import pytest

from graphs.golden.regen import golden_graph
from pipo.runtime import (Compute, Executors, GraphBuilder, GraphError, LoadKV, LoadWeight, SaveKV,
                          check_graph, graph_from_json, graph_to_json)
from pipo.runtime.graph import dumps_graph, tasks_in_order
from pipo.runtime.tasks import LOAD_KV, LOAD_WEIGHT


def test_task_names_keys_and_default_lanes():
    load = LoadWeight("L3.attn", 1)
    assert (load.kind, load.keys, load.lane, load.name) == (
        "LoadWeight", ("L3.attn", 1), LOAD_WEIGHT, "LoadWeight(L3.attn,1)")
    assert Compute("head", 0).name == "Compute(head,0,-,-)"
    assert LoadKV(0, 1, 0).lane == LOAD_KV
    assert LoadWeight("embed", 0, lane="disk").lane == "disk"
    with pytest.raises(AttributeError):
        load.slot = 2  # frozen


def _chain() -> GraphBuilder:
    """load w0 <- A; compute reads it; a second load refills slot 0 with B."""
    b = GraphBuilder()
    b.add(LoadWeight("A", 0), writes=[("w", 0, "A")])
    b.add(Compute("A", 0, 0), reads=[("w", 0, "A")], writes=[("act", 0, "A")])
    b.add(Compute("A", 1, 0), reads=[("w", 0, "A")], writes=[("act", 1, "A")])
    b.add(LoadWeight("B", 0), writes=[("w", 0, "B")])
    b.add(Compute("B", 0, 0), reads=[("w", 0, "B"), ("act", 0, "A")], writes=[("act", 0, "B")])
    return b


def test_builder_derives_read_after_write_write_after_read_and_write_after_write():
    g = _chain().graph
    assert set(g.edges) == {
        ("LoadWeight(A,0)", "Compute(A,0,0,-)"), ("LoadWeight(A,0)", "Compute(A,1,0,-)"),
        ("Compute(A,0,0,-)", "LoadWeight(B,0)"), ("Compute(A,1,0,-)", "LoadWeight(B,0)"),
        ("LoadWeight(A,0)", "LoadWeight(B,0)"),
        ("LoadWeight(B,0)", "Compute(B,0,0,-)"), ("Compute(A,0,0,-)", "Compute(B,0,0,-)")}
    assert [t.name for t in tasks_in_order(g)][0] == "LoadWeight(A,0)"
    check_graph(g)


def test_builder_policy_edges_and_duplicates():
    b = GraphBuilder()
    first = b.add(LoadKV(0, 0, 0), writes=[("kv", 0, "x")])
    second = b.add(SaveKV(1, 0, 1), after=[first])
    assert b.graph.has_edge(first, second)
    with pytest.raises(GraphError, match=r"duplicate task LoadKV\(0,0,0\)"):
        b.add(LoadKV(0, 0, 0))


def _problems(graph, executors=None) -> str:
    with pytest.raises(GraphError) as info:
        check_graph(graph, executors)
    return str(info.value)


def test_check_catches_a_cycle():
    g = _chain().graph
    g.add_edge("Compute(B,0,0,-)", "LoadWeight(A,0)")
    assert "cycle" in _problems(g)


def test_check_catches_a_node_whose_task_has_another_name():
    g = _chain().graph
    g.add_node("Compute(X,0,-,-)", task=Compute("A", 0, 0), reads=(), writes=(), order=99)
    assert "node Compute(X,0,-,-) holds task named Compute(A,0,0,-)" in _problems(g)
    g.add_node("bare")
    assert "node bare has no Task record" in _problems(g)


def test_check_catches_a_missing_executor():
    table = Executors()
    table.register(LoadWeight, lambda task, ctx: None)
    message = _problems(_chain().graph, table)
    assert "no executor registered for task kind Compute" in message
    assert "task kind LoadWeight" not in message


def test_check_catches_a_read_with_no_writer():
    b = GraphBuilder()
    b.add(Compute("A", 0), reads=[("act", 0, "embed")])
    assert "Compute(A,0,-,-) reads ('act', 0) but no writer of it precedes it" in _problems(b.graph)


def test_check_catches_wrong_content():
    b = GraphBuilder()
    b.add(LoadWeight("A", 0), writes=[("w", 0, "A")])
    b.add(Compute("B", 0, 0), reads=[("w", 0, "B")])
    assert "expecting B but LoadWeight(A,0) wrote A" in _problems(b.graph)


def test_check_catches_unordered_writers():
    g = nx.DiGraph()
    for i, name in enumerate("AB"):
        task = LoadWeight(name, 0)
        g.add_node(task.name, task=task, reads=(), writes=(("w", 0, name),), order=i)
    message = _problems(g)
    assert ("LoadWeight(A,0) and LoadWeight(B,0) use ('w', 0) for A and B without an order"
            in message)


def test_check_reports_every_problem_at_once():
    b = GraphBuilder()
    b.add(Compute("A", 0), reads=[("act", 0, "x")])
    b.add(Compute("B", 0), reads=[("act", 1, "y")])
    assert "(2 problems)" in _problems(b.graph)


def test_check_catches_a_removed_slot_reuse_edge_in_a_built_graph():
    g = nx.DiGraph(golden_graph("pipo", "decode"))
    check_graph(g)
    refill = "LoadWeight(L0.mlp,0)"  # slot 0 held embed, read by both embed computes
    reader = "Compute(embed,1,0,-)"
    assert g.has_edge(reader, refill)
    g.remove_edge(reader, refill)
    message = _problems(g)
    assert f"{reader} and {refill} use ('w', 0) for embed and L0.mlp without an order" in message


def test_json_round_trip_keeps_tasks_accesses_order_and_edges():
    g = golden_graph("pipo", "decode")
    doc = graph_to_json(g)
    back = graph_from_json(json.loads(json.dumps(doc)))
    assert graph_to_json(back) == doc
    assert set(back.edges) == set(g.edges)
    assert {n: back.nodes[n]["task"] for n in back} == {n: g.nodes[n]["task"] for n in g}
    assert dumps_graph(back) == dumps_graph(g)
    check_graph(back)


def test_json_rejects_an_unknown_kind():
    doc = graph_to_json(_chain().graph)
    doc["nodes"][0]["kind"] = "Teleport"
    with pytest.raises(GraphError, match="unknown task kind 'Teleport'"):
        graph_from_json(doc)
