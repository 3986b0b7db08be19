"""The scheduler: runs a checked step graph on lanes with asyncio.

Policy
    A task is *ready* when all its predecessors finished (on a CUDA lane: were enqueued; their events
    order the GPU work). Each lane takes its ready tasks one at a time, highest priority first:
    priority = longest path (in tasks) from the task to the end of the graph, ties broken by the
    builder's program order. So the critical path goes first and equal work keeps program order.

Run boundaries
    When a run starts, every lane it uses gets ``begin_run``; the marker a lane returns is added to
    the ``after`` of the run's root tasks on it (a CUDA lane: one event recorded on the caller's
    stream, so a step's roots wait for the caller's inputs and the previous step, and for nothing
    else of their own step). When it ends, every lane gets ``end_run`` with the markers of its sink
    tasks (tasks without successors; every task is an ancestor of one), so the caller's later work
    is ordered after the whole step at the cost of one wait per sink.

Leading tasks (``start`` / ``finish``)
    A program's *prefix* is the set of tasks that neither run on the compute lane nor have an
    ancestor there (computed once, by :meth:`Runtime.compile`): in a decode step, the first weight
    loads, disk reads and KV loads, which do not depend on the token being sampled.
    :meth:`Runtime.start` releases only the prefix and returns a :class:`StartedRun` once each lane
    is busy with a prefix task or has none left to take; that work stays in flight (a thread lane's
    thread, a GPU stream, an aiofiles read) while the caller works, e.g. reads the previous step's
    logits and samples. Work on an event-loop lane runs only while the runtime drives the loop.
    :meth:`StartedRun.finish` hands the run back: lanes get ``resume_run`` (a CUDA lane records a
    second caller event, after the inputs the caller just uploaded), tasks outside the prefix whose
    predecessors are all in it also wait on that marker, and everything else runs.
    :meth:`StartedRun.cancel` lets the prefix end and runs nothing else. Prefix tasks may read only
    what the caller set in ``ctx`` before ``start``; a prefix task's failure is raised by ``start``
    or, if it came later, by ``finish``/``cancel``.

State (per run)
    ``waiting[n]``: unfinished predecessors of node n; ``ready[lane]``: a heap of (priority, n);
    ``markers[n]``: what n's lane returned (``None`` on CPU, a CUDA event on a GPU lane);
    ``extra[n]``: a boundary marker n also waits on; ``finished``: count of finished nodes;
    ``target``: how many must finish (all; the prefix for a cancelled start); ``held``: ready tasks
    outside the prefix while a started run waits for its caller; ``running``: lanes inside a task
    while ``start`` waits to settle. One long-lived worker coroutine per lane; no asyncio Task per
    node.

Invariants
    A task starts only after every predecessor's lane returned; each lane runs one task at a time;
    a Runtime has at most one run in flight; the run ends when ``target`` tasks finished, or at the
    first exception or interrupt (``KeyboardInterrupt``, cancellation): the other workers are
    cancelled, thread lanes drained (bounded), lanes get ``end_run`` with every finished task's
    marker, and the exception is re-raised (a task's failure with its name in a note). No worker
    or asyncio task outlives a run.

Graphs are compiled once (:meth:`Runtime.compile`: check, then ``pipo.runtime.program`` freezes the
graph and precomputes priorities, executors, prefix and sinks) and the :class:`Program` is reused
for every step; per-step values live in ctx. ``Program``, ``RunStats`` and ``TaskRecord`` are
importable from here as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import defaultdict
from functools import partial
from typing import Any, Callable, Mapping

import networkx as nx

from pipo.runtime.graph import check_graph
from pipo.runtime.lanes import Lane, RunInfo, cpu_lane
from pipo.runtime.program import Program, RunStats, TaskRecord, compile_program
from pipo.runtime.registry import EXECUTORS, Executors

DRAIN_TIMEOUT_S = 30.0
_RUN_IDS = itertools.count(1)


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
        self._active: _Run | None = None

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
        return compile_program(graph, self.executors)

    def run(self, graph: nx.DiGraph | Program, ctx: Any = None) -> RunStats:
        """Run every task of ``graph`` (a graph or a compiled Program) with context ``ctx``."""
        run = self._launch(graph, ctx, split=False)
        return self._drive(run, run.main)

    def start(self, graph: nx.DiGraph | Program, ctx: Any = None) -> StartedRun:
        """Start a run with only its prefix (see the module docstring); finish or cancel it next."""
        run = self._launch(graph, ctx, split=True)
        self._drive(run, run.settled)
        if run.main.done() and run.main.exception() is not None:
            self._active = None
            run.main.result()  # a prefix task failed: raise it now
        return StartedRun(self, run)

    async def run_async(self, program: Program, ctx: Any = None) -> RunStats:
        """Coroutine form of :meth:`run`, for callers that own an event loop."""
        return await _Run(self, program, ctx, asyncio.get_running_loop(), split=False).execute()

    def _launch(self, graph: nx.DiGraph | Program, ctx: Any, split: bool) -> _Run:
        if self._active is not None:
            raise RuntimeError("a started run is still pending: finish() or cancel() it first")
        program = graph if isinstance(graph, Program) else self.compile(graph)
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        run = _Run(self, program, ctx, self._loop, split)
        run.main = self._loop.create_task(run.execute())
        self._active = run
        return run

    def _drive(self, run: _Run, until: asyncio.Future) -> Any:
        """Run the loop until ``until``; on any exception (an interrupt too) abort ``run`` first."""
        try:
            result = self._loop.run_until_complete(until)
        except BaseException:
            self._abort(run)
            raise
        if until is run.main:
            self._active = None
        return result

    def _abort(self, run: _Run) -> None:
        """Cancel ``run``'s workers, wait for them and for thread lanes, forget the run."""
        self._active = None
        if run.main.done():
            return
        run.main.cancel()
        with contextlib.suppress(BaseException):
            self._loop.run_until_complete(run.main)
        with contextlib.suppress(BaseException):
            self._loop.run_until_complete(run.drain())
        if run.main.done() and not run.main.cancelled():
            run.main.exception()  # retrieved: asyncio would log it at exit otherwise

    def _complete(self, run: _Run, rest: bool) -> RunStats:
        if self._active is not run:
            raise RuntimeError("this started run already finished or was cancelled")
        if rest:
            run.resume()
        else:
            run.skip_rest()
        return self._drive(run, run.main)

    def close(self) -> None:
        """Stop the lanes and the event loop (cancelling a started run). Idempotent."""
        if self._active is not None:
            self._abort(self._active)
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


class StartedRun:
    """A run begun by :meth:`Runtime.start`: its prefix is in flight. Call exactly one of
    :meth:`finish` and :meth:`cancel`."""

    def __init__(self, runtime: Runtime, run: _Run):
        self._runtime, self._run = runtime, run

    def finish(self) -> RunStats:
        """Run the rest of the program (after the caller set what it reads); return the stats."""
        return self._runtime._complete(self._run, rest=True)

    def cancel(self) -> None:
        """Let the prefix finish, run nothing else, end the run."""
        self._runtime._complete(self._run, rest=False)


class _Run:
    """The mutable state of one run of a Program (see the module docstring)."""

    def __init__(self, runtime: Runtime, program: Program, ctx: Any,
                 loop: asyncio.AbstractEventLoop, split: bool):
        self.rt, self.p, self.ctx = runtime, program, ctx
        n = len(program.names)
        self.info = RunInfo(next(_RUN_IDS))
        self.waiting = [len(p) for p in program.preds]
        self.markers: list[Any] = [None] * n
        self.extra: list[Any] = [None] * n
        self.finished, self.target = 0, n
        self.holding = self.settling = split
        self.held: list[int] = []
        self.running: set[str] = set()
        self.settled = loop.create_future()
        self.main: asyncio.Task | None = None
        self.lanes = {name: runtime.lane(name) for name in sorted(set(program.lanes))}
        self.ready: dict[str, list] = {name: [] for name in self.lanes}
        self.wake = {name: asyncio.Event() for name in self.lanes}
        self.stats = RunStats(busy_s={name: 0.0 for name in self.lanes}, run_id=self.info.id)
        self.t0 = self.settled_at = time.perf_counter()
        self.gap_s = 0.0
        begin = {name: lane.begin_run(self.info) for name, lane in self.lanes.items()}
        for i, count in enumerate(self.waiting):
            if count == 0:
                self.extra[i] = begin[program.lanes[i]]
                self._release(i)

    async def execute(self) -> RunStats:
        """Run the tasks up to ``target``; on a failure cancel the rest, drain, re-raise."""
        try:
            if self.p.names:
                await self._run_workers()
            self._end(complete=self.target == len(self.p.names))
        finally:
            self._mark_settled()
        self.stats.wall_s = time.perf_counter() - self.t0 - self.gap_s
        return self.stats

    async def _run_workers(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for name, lane in self.lanes.items():
                    group.create_task(self._worker(name, lane))
        except BaseExceptionGroup as eg:
            await self._fail()
            raise _first_leaf(eg) from None
        except BaseException:  # cancelled, or an interrupt raised inside a worker
            await self._fail()
            raise

    async def _fail(self) -> None:
        try:
            await self.drain()
        finally:
            self._end(complete=False)

    async def drain(self) -> None:
        """Wait (bounded) for work a lane's thread is still doing, so no task of a failed run
        writes into buffers the next run uses; cancelling the awaiting coroutine cannot stop it."""
        for lane in self.lanes.values():
            try:
                await asyncio.wait_for(lane.run(lambda: None), DRAIN_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the original failure is what the caller must see
                pass

    def _end(self, complete: bool) -> None:
        """Tell every lane the run ended: the sinks' markers, or (early end) every finished one."""
        chosen = self.p.sinks if complete else [i for i, m in enumerate(self.markers) if m is not None]
        by_lane = defaultdict(list)
        for i in chosen:
            by_lane[self.p.lanes[i]].append(self.markers[i])
        for name, lane in self.lanes.items():
            lane.end_run(self.info, by_lane.get(name, ()))

    def resume(self) -> None:
        """The caller hands a started run back: release what was held, after a resume marker."""
        if self.main.done():
            return
        self.holding = self.settling = False
        self.gap_s = time.perf_counter() - self.settled_at
        marks = {name: lane.resume_run(self.info) for name, lane in self.lanes.items()}
        for i in self.p.frontier:
            self.extra[i] = marks[self.p.lanes[i]]
        held, self.held = self.held, []
        for i in held:
            self._release(i)

    def skip_rest(self) -> None:
        """End a started run once its prefix finished; nothing outside the prefix runs."""
        self.settling = False
        self.held.clear()
        self.target = sum(self.p.in_prefix)
        for event in self.wake.values():
            event.set()

    def _release(self, i: int) -> None:
        if self.holding and not self.p.in_prefix[i]:
            self.held.append(i)
            return
        lane = self.p.lanes[i]
        heapq.heappush(self.ready[lane], (self.p.priority[i], i))
        self.wake[lane].set()

    def _mark_settled(self) -> None:
        if not self.settled.done():
            self.settling = False
            self.settled_at = time.perf_counter()
            self.settled.set_result(None)

    def _check_settled(self) -> None:
        """A started run has settled when each lane is busy or has nothing it may take."""
        if all(name in self.running or not heap for name, heap in self.ready.items()):
            self._mark_settled()

    async def _worker(self, name: str, lane: Lane) -> None:
        heap, wake, p, markers, extra = self.ready[name], self.wake[name], self.p, self.markers, self.extra
        while self.finished < self.target:
            if not heap:
                if self.settling:
                    self._check_settled()
                wake.clear()
                await wake.wait()
                continue
            _, i = heapq.heappop(heap)
            after = [markers[j] for j in p.preds[i]]
            if extra[i] is not None:
                after.append(extra[i])
            if self.settling:
                self.running.add(name)
                self._check_settled()
            start = time.perf_counter()
            try:
                marker = await lane.run(partial(p.executors[i], p.tasks[i], self.ctx), after)
            except Exception as exc:
                exc.add_note(f"while running task {p.names[i]} on lane {name}")
                raise
            self.running.discard(name)
            self._finish(i, marker, name, start, time.perf_counter())

    def _finish(self, i: int, marker: Any, lane: str, start: float, end: float) -> None:
        self.markers[i] = marker
        self.stats.busy_s[lane] += end - start
        if self.rt.trace:
            self.stats.records.append(
                TaskRecord(self.p.names[i], lane, start - self.t0, end - self.t0))
        self.finished += 1
        waiting = self.waiting
        for s in self.p.succs[i]:
            waiting[s] -= 1
            if waiting[s] == 0:
                self._release(s)
        if self.finished >= self.target:
            for event in self.wake.values():
                event.set()


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
