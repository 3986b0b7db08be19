"""The scheduler: runs a checked step graph on lanes with asyncio.

Policy
    A task is *ready* when all its predecessors finished (on a CUDA lane: were enqueued; their events
    order the GPU work). Each lane takes its ready tasks one at a time, highest priority first:
    priority = longest path (in tasks) from the task to the end of the graph, ties broken by the
    builder's program order. So the critical path goes first and equal work keeps program order.

State (per run)
    ``waiting[n]``: unfinished predecessors of node n; ``ready[lane]``: a heap of (priority, n);
    ``markers[n]``: what n's lane returned (``None`` on CPU, a CUDA event on a GPU lane);
    ``finished``: count of finished nodes. One long-lived worker coroutine per lane; no asyncio Task
    per node.

Invariants
    A task starts only after every predecessor's lane returned; each lane runs one task at a time;
    the run ends when every task finished, or at the first exception: the other workers are
    cancelled and the exception re-raised with the failing task's name in a note. No worker outlives
    a run.

Graphs are compiled once (:meth:`Runtime.compile`: check, freeze, precompute priorities and
executors) and the :class:`Program` is reused for every step; per-step values live in the context.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import networkx as nx

from pipo.runtime.graph import check_graph
from pipo.runtime.lanes import Lane, cpu_lane
from pipo.runtime.registry import EXECUTORS, Executors

DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Program:
    """A compiled, immutable step graph: node order, edges, priorities and bound executors."""

    graph: nx.DiGraph
    names: tuple[str, ...]
    tasks: tuple
    lanes: tuple[str, ...]
    preds: tuple[tuple[int, ...], ...]
    succs: tuple[tuple[int, ...], ...]
    priority: tuple[tuple[int, int], ...]
    executors: tuple[Callable, ...]


@dataclass
class TaskRecord:
    """When one task ran: seconds since the run started."""

    name: str
    lane: str
    start_s: float
    end_s: float


@dataclass
class RunStats:
    """What a run did: wall time, per-lane busy time and (when traced) per-task records."""

    wall_s: float = 0.0
    busy_s: dict[str, float] = field(default_factory=dict)
    records: list[TaskRecord] = field(default_factory=list)

    def busy_fraction(self, lane: str) -> float:
        """Busy time of ``lane`` over the run's wall time."""
        return self.busy_s.get(lane, 0.0) / self.wall_s if self.wall_s else 0.0


class Runtime:
    """Runs step graphs on lanes. Owns the lanes and an event loop; use as a context manager.

    ``lane_factory(name) -> Lane`` makes a lane the first time a task names it (default: CPU lanes).
    ``executors`` is the task-kind table (default: the global one). ``trace=True`` keeps a
    :class:`TaskRecord` per task in the returned stats.
    """

    def __init__(self, executors: Executors = EXECUTORS,
                 lane_factory: Callable[[str], Lane] = cpu_lane, trace: bool = False):
        self.executors = executors
        self.trace = trace
        self._lane_factory = lane_factory
        self._lanes: dict[str, Lane] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def lanes(self) -> Mapping[str, Lane]:
        """The lanes made so far, by name."""
        return dict(self._lanes)

    def lane(self, name: str) -> Lane:
        """The lane called ``name``, made on first use."""
        if name not in self._lanes:
            self._lanes[name] = self._lane_factory(name)
        return self._lanes[name]

    def compile(self, graph: nx.DiGraph) -> Program:
        """Check ``graph`` once and turn it into a reusable :class:`Program`."""
        check_graph(graph, self.executors)
        graph = nx.freeze(graph.copy())
        names = tuple(nx.lexicographical_topological_sort(
            graph, key=lambda n: graph.nodes[n].get("order", 0)))
        index = {n: i for i, n in enumerate(names)}
        depth = _longest_path_to_end(graph, names)
        tasks = tuple(graph.nodes[n]["task"] for n in names)
        return Program(
            graph=graph, names=names, tasks=tasks, lanes=tuple(t.lane for t in tasks),
            preds=tuple(tuple(index[p] for p in graph.predecessors(n)) for n in names),
            succs=tuple(tuple(index[s] for s in graph.successors(n)) for n in names),
            priority=tuple((-depth[n], graph.nodes[n].get("order", i)) for i, n in enumerate(names)),
            executors=tuple(self.executors.lookup(type(t)) for t in tasks))

    def run(self, graph: nx.DiGraph | Program, ctx: Any = None) -> RunStats:
        """Run every task of ``graph`` (a graph or a compiled Program) with context ``ctx``."""
        program = graph if isinstance(graph, Program) else self.compile(graph)
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self.run_async(program, ctx))

    async def run_async(self, program: Program, ctx: Any = None) -> RunStats:
        """Coroutine form of :meth:`run`, for callers that own an event loop."""
        return await _Run(self, program, ctx).execute()

    def close(self) -> None:
        """Stop the lanes and the event loop. Idempotent."""
        for lane in self._lanes.values():
            lane.close()
        self._lanes.clear()
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _longest_path_to_end(graph: nx.DiGraph, order: tuple[str, ...]) -> dict[str, int]:
    depth: dict[str, int] = {}
    for node in reversed(order):
        depth[node] = 1 + max((depth[s] for s in graph.successors(node)), default=0)
    return depth


class _Run:
    """The mutable state of one run of a Program (see the module docstring)."""

    def __init__(self, runtime: Runtime, program: Program, ctx: Any):
        self.rt, self.p, self.ctx = runtime, program, ctx
        self.waiting = [len(p) for p in program.preds]
        self.markers: list[Any] = [None] * len(program.names)
        self.finished = 0
        lane_names = sorted(set(program.lanes))
        self.ready: dict[str, list] = {name: [] for name in lane_names}
        self.wake = {name: asyncio.Event() for name in lane_names}
        self.stats = RunStats(busy_s={name: 0.0 for name in lane_names})
        for i, count in enumerate(self.waiting):
            if count == 0:
                self._release(i)

    async def execute(self) -> RunStats:
        """Run every task; on the first failure cancel the rest, drain the lanes, re-raise."""
        self.t0 = time.perf_counter()
        if self.p.names:
            try:
                async with asyncio.TaskGroup() as group:
                    for name in self.ready:
                        group.create_task(self._worker(name, self.rt.lane(name)))
            except BaseExceptionGroup as eg:
                await self._drain()
                raise _first_leaf(eg) from None
        self.stats.wall_s = time.perf_counter() - self.t0
        return self.stats

    async def _drain(self) -> None:
        """Wait (bounded) for work a lane's thread is still doing, so no task of a failed run
        writes into buffers the next run uses; cancelling the awaiting coroutine cannot stop it."""
        for name in self.ready:
            try:
                await asyncio.wait_for(self.rt.lane(name).run(lambda: None), DRAIN_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the original failure is what the caller must see
                pass

    def _release(self, i: int) -> None:
        lane = self.p.lanes[i]
        heapq.heappush(self.ready[lane], (self.p.priority[i], i))
        self.wake[lane].set()

    async def _worker(self, name: str, lane: Lane) -> None:
        heap, wake, p = self.ready[name], self.wake[name], self.p
        while self.finished < len(p.names):
            if not heap:
                wake.clear()
                await wake.wait()
                continue
            _, i = heapq.heappop(heap)
            task, fn = p.tasks[i], p.executors[i]
            start = time.perf_counter()
            try:
                marker = await lane.run(lambda: fn(task, self.ctx), [self.markers[j] for j in p.preds[i]])
            except Exception as exc:
                exc.add_note(f"while running task {p.names[i]} on lane {name}")
                raise
            self._finish(i, marker, name, start, time.perf_counter())

    def _finish(self, i: int, marker: Any, lane: str, start: float, end: float) -> None:
        self.markers[i] = marker
        self.stats.busy_s[lane] += end - start
        if self.rt.trace:
            self.stats.records.append(
                TaskRecord(self.p.names[i], lane, start - self.t0, end - self.t0))
        self.finished += 1
        for s in self.p.succs[i]:
            self.waiting[s] -= 1
            if self.waiting[s] == 0:
                self._release(s)
        if self.finished == len(self.p.names):
            for event in self.wake.values():
                event.set()


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
