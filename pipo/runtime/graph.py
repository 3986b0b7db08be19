"""Step graphs: building them with dataflow edges, checking them once, saving them as JSON.

A graph is a ``networkx.DiGraph`` whose node ids are task names and whose node attributes are
``task`` (the frozen task record), ``reads`` and ``writes`` (tuples of *accesses*) and ``order`` (the
program order the builder emitted). An access is ``(space, slot, content)``: e.g. ``("w", 1,
"L3.attn")`` is weight slot 1 holding block L3.attn, ``("act", 0, "L3.mlp")`` is micro-batch 0's
hidden state as left by block L3.mlp.

:class:`GraphBuilder` adds the edges that the declared accesses imply (read after write, write after
read, write after write), so a schedule states only its policy: the order of tasks, extra ordering
edges, and how many slots exist. :func:`check_graph` verifies a finished graph, from any source,
against the invariants the runtime relies on.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import fields
from typing import Iterable, Iterator

import networkx as nx

from pipo.runtime.tasks import Task

Access = tuple  # (space: str, slot: int | str, content: str)


class GraphError(ValueError):
    """A step graph breaks an invariant; the message lists every problem found."""


class GraphBuilder:
    """Collects tasks in program order and derives dataflow edges from their accesses."""

    def __init__(self) -> None:
        self.graph = nx.DiGraph()
        self._writer: dict[tuple, str] = {}
        self._readers: dict[tuple, list[str]] = defaultdict(list)

    def add(self, task: Task, *, reads: Iterable[Access] = (), writes: Iterable[Access] = (),
            after: Iterable[str] = ()) -> str:
        """Add ``task``; return its node name. ``after`` names extra predecessors (policy edges)."""
        name = task.name
        if name in self.graph:
            raise GraphError(f"duplicate task {name}")
        reads, writes = tuple(reads), tuple(writes)
        self.graph.add_node(name, task=task, reads=reads, writes=writes, order=len(self.graph))
        for space, slot, _ in reads:
            self._edge(self._writer.get((space, slot)), name)
        for space, slot, _ in writes:
            key = (space, slot)
            self._edge(self._writer.get(key), name)
            for reader in self._readers.pop(key, []):
                self._edge(reader, name)
            self._writer[key] = name
        for space, slot, _ in reads:
            if (space, slot) not in {(s, k) for s, k, _ in writes}:
                self._readers[(space, slot)].append(name)
        for pred in after:
            self._edge(pred, name)
        return name

    def _edge(self, src: str | None, dst: str) -> None:
        if src is not None and src != dst:
            self.graph.add_edge(src, dst)


def tasks_in_order(graph: nx.DiGraph) -> Iterator[Task]:
    """The graph's tasks in the builder's program order."""
    for name in sorted(graph, key=lambda n: graph.nodes[n].get("order", 0)):
        yield graph.nodes[name]["task"]


def check_graph(graph: nx.DiGraph, executors=None) -> None:
    """Raise :class:`GraphError` unless ``graph`` is a valid step graph.

    Invariants: acyclic; each node carries a ``Task`` whose name is the node id; every task kind has
    an executor (when ``executors`` is given); every read sees, among its ancestors, exactly one
    latest writer of that slot and it wrote the expected content; any two accesses of one slot with
    different contents are ordered (so a slot is refilled only after its last reader finished).
    """
    problems = _node_problems(graph, executors)
    if not nx.is_directed_acyclic_graph(graph):
        problems.append(f"graph has a cycle: {nx.find_cycle(graph)}")
    if not problems:
        problems += _access_problems(graph)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise GraphError(f"invalid step graph ({len(problems)} problems):\n  {shown}{more}")


def _node_problems(graph: nx.DiGraph, executors) -> list[str]:
    problems = []
    for name, data in graph.nodes(data=True):
        task = data.get("task")
        if not isinstance(task, Task):
            problems.append(f"node {name} has no Task record")
            continue
        if task.name != name:
            problems.append(f"node {name} holds task named {task.name}")
        if executors is not None and executors.find(type(task)) is None:
            problems.append(f"no executor registered for task kind {task.kind} ({name}); "
                            f"register one with @executor({task.kind})")
    return problems


def _ancestor_masks(graph: nx.DiGraph, order: list[str]) -> dict[str, int]:
    """Bitmask of ancestors per node (bit i = order[i]); cheap pairwise reachability."""
    index = {n: i for i, n in enumerate(order)}
    masks: dict[str, int] = {}
    for node in order:
        mask = 0
        for pred in graph.predecessors(node):
            mask |= masks[pred] | (1 << index[pred])
        masks[node] = mask
    return masks


def _access_problems(graph: nx.DiGraph) -> list[str]:
    order = list(nx.topological_sort(graph))
    index = {n: i for i, n in enumerate(order)}
    anc = _ancestor_masks(graph, order)
    before = lambda a, b: bool(anc[b] >> index[a] & 1)  # noqa: E731 - a is an ancestor of b
    by_slot: dict[tuple, list[tuple[str, str, str]]] = defaultdict(list)
    for node in order:
        data = graph.nodes[node]
        for space, slot, content in data.get("reads", ()):
            by_slot[(space, slot)].append((node, "r", content))
        for space, slot, content in data.get("writes", ()):
            by_slot[(space, slot)].append((node, "w", content))
    problems = []
    for key, accesses in by_slot.items():
        problems += _slot_problems(key, accesses, before, index)
    return problems


def _slot_problems(key, accesses, before, index) -> list[str]:
    problems = []
    writes = [(n, c) for n, mode, c in accesses if mode == "w"]
    for node, mode, content in accesses:
        if mode != "r":
            continue
        prior = [(w, c) for w, c in writes if w != node and before(w, node)]
        if not prior:
            problems.append(f"{node} reads {key} but no writer of it precedes it")
            continue
        last, last_content = max(prior, key=lambda wc: index[wc[0]])
        if not all(before(w, last) for w, _ in prior if w != last):
            problems.append(f"{node} reads {key} but its writers are not ordered")
        elif last_content != content:
            problems.append(f"{node} reads {key} expecting {content} but {last} wrote "
                            f"{last_content}")
    for i, (a, _, ca) in enumerate(accesses):
        for b, _, cb in accesses[i + 1:]:
            if ca != cb and a != b and not (before(a, b) or before(b, a)):
                problems.append(f"{a} and {b} use {key} for {ca} and {cb} without an order")
    return problems


def graph_to_json(graph: nx.DiGraph) -> dict:
    """A plain-data description of the graph (stable order), for golden files and tools."""
    nodes = []
    for task in tasks_in_order(graph):
        data = graph.nodes[task.name]
        keys = {f.name: getattr(task, f.name) for f in fields(task) if f.name != "lane"}
        nodes.append({"name": task.name, "kind": task.kind, "lane": task.lane, "keys": keys,
                      "reads": [list(a) for a in data["reads"]],
                      "writes": [list(a) for a in data["writes"]]})
    edges = sorted([list(e) for e in graph.edges])
    return {"nodes": nodes, "edges": edges}


def graph_from_json(doc: dict) -> nx.DiGraph:
    """Rebuild a graph saved by :func:`graph_to_json` (task kinds found among Task subclasses)."""
    kinds = {cls.__name__: cls for cls in _task_classes(Task)}
    graph = nx.DiGraph()
    for i, node in enumerate(doc["nodes"]):
        if node["kind"] not in kinds:
            raise GraphError(f"unknown task kind {node['kind']!r} in graph file")
        task = kinds[node["kind"]](**node["keys"], lane=node["lane"])
        graph.add_node(task.name, task=task, order=i,
                       reads=tuple(tuple(a) for a in node["reads"]),
                       writes=tuple(tuple(a) for a in node["writes"]))
    graph.add_edges_from(tuple(e) for e in doc["edges"])
    return graph


def dumps_graph(graph: nx.DiGraph) -> str:
    """JSON text of :func:`graph_to_json`, one node per line for readable diffs."""
    doc = graph_to_json(graph)
    lines = [json.dumps(n, sort_keys=True) for n in doc["nodes"]]
    edge_lines = [json.dumps(e) for e in doc["edges"]]
    return ('{"nodes": [\n' + ",\n".join(lines) + '\n],\n"edges": [\n' + ",\n".join(edge_lines)
            + "\n]}\n")


def _task_classes(base: type) -> Iterator[type]:
    for cls in base.__subclasses__():
        yield cls
        yield from _task_classes(cls)
