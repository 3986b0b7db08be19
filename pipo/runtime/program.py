"""A compiled step graph: the immutable :class:`Program` the scheduler runs, and what a run reports.

:func:`compile_program` does the once-per-graph work: freeze the graph, fix a topological order
(program order among equals), turn edges into index tuples, and precompute each task's priority
(longest path to the end, then program order), executor, whether it lies in the prefix (neither it
nor an ancestor runs on the compute lane), the frontier right after the prefix and the sinks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import networkx as nx

from pipo.runtime.registry import Executors
from pipo.runtime.tasks import COMPUTE


@dataclass(frozen=True)
class Program:
    """A compiled, immutable step graph: node order, edges, priorities and bound executors.

    ``in_prefix[i]``: task i and all its ancestors run off the compute lane (see the module
    docstring); ``frontier``: tasks outside the prefix whose predecessors all lie in it;
    ``sinks``: tasks without successors.
    """

    graph: nx.DiGraph
    names: tuple[str, ...]
    tasks: tuple
    lanes: tuple[str, ...]
    preds: tuple[tuple[int, ...], ...]
    succs: tuple[tuple[int, ...], ...]
    priority: tuple[tuple[int, int], ...]
    executors: tuple[Callable, ...]
    in_prefix: tuple[bool, ...] = ()
    frontier: tuple[int, ...] = ()
    sinks: tuple[int, ...] = ()


@dataclass
class TaskRecord:
    """When one task ran: seconds since the run started."""

    name: str
    lane: str
    start_s: float
    end_s: float


@dataclass
class RunStats:
    """What a run did: wall time, per-lane busy time and (when traced) per-task records.

    ``wall_s`` is the time the runtime spent driving the run; for a started run it leaves out the
    caller's work between ``start`` and ``finish`` (task times still count from ``start``).
    ``run_id`` is the :class:`~pipo.runtime.lanes.RunInfo` id the lanes saw.
    """

    wall_s: float = 0.0
    busy_s: dict[str, float] = field(default_factory=dict)
    records: list[TaskRecord] = field(default_factory=list)
    run_id: int = 0

    def busy_fraction(self, lane: str) -> float:
        """Busy time of ``lane`` over the run's wall time."""
        return self.busy_s.get(lane, 0.0) / self.wall_s if self.wall_s else 0.0


def compile_program(graph: nx.DiGraph, executors: Executors) -> Program:
    """The :class:`Program` of a checked ``graph`` (see the module docstring)."""
    graph = nx.freeze(graph.copy())
    names = tuple(nx.lexicographical_topological_sort(
        graph, key=lambda n: graph.nodes[n].get("order", 0)))
    index = {n: i for i, n in enumerate(names)}
    depth = longest_path_to_end(graph, names)
    tasks = tuple(graph.nodes[n]["task"] for n in names)
    lanes = tuple(t.lane for t in tasks)
    preds = tuple(tuple(index[p] for p in graph.predecessors(n)) for n in names)
    succs = tuple(tuple(index[s] for s in graph.successors(n)) for n in names)
    in_prefix = _prefix(lanes, preds)
    return Program(
        graph=graph, names=names, tasks=tasks, lanes=lanes, preds=preds, succs=succs,
        priority=tuple((-depth[n], graph.nodes[n].get("order", i)) for i, n in enumerate(names)),
        executors=tuple(executors.lookup(type(t)) for t in tasks), in_prefix=in_prefix,
        frontier=tuple(i for i, p in enumerate(preds)
                       if not in_prefix[i] and all(in_prefix[j] for j in p)),
        sinks=tuple(i for i, s in enumerate(succs) if not s))


def longest_path_to_end(graph: nx.DiGraph, order: tuple[str, ...]) -> dict[str, int]:
    """Per node: tasks on the longest path from it to the end of ``graph`` (``order``: topological)."""
    depth: dict[str, int] = {}
    for node in reversed(order):
        depth[node] = 1 + max((depth[s] for s in graph.successors(node)), default=0)
    return depth


def _prefix(lanes: tuple[str, ...], preds: tuple[tuple[int, ...], ...]) -> tuple[bool, ...]:
    """Per task (topological order): neither it nor any ancestor runs on the compute lane."""
    inside: list[bool] = []
    for lane, before in zip(lanes, preds):
        inside.append(lane != COMPUTE and all(inside[j] for j in before))
    return tuple(inside)
