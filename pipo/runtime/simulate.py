"""Replay a compiled step graph on a virtual clock: the scheduler's policy with predicted durations.

:func:`simulate` runs a :class:`~pipo.runtime.program.Program` (the same object the runtime runs)
without executing anything. It knows only task kinds, edges, lanes and a ``duration(task) ->
seconds`` function, so it is model-agnostic; the planner supplies durations from a measured
machine profile (:mod:`pipo.planner.costs`).

Policy (the scheduler's, :mod:`pipo.runtime.scheduler`)
    A task is ready when every predecessor finished. Each lane runs one task at a time; when a lane
    is idle it takes its ready task of highest priority (the Program's precomputed priority: longest
    path to the end, then program order). Time advances from one task end to the next; ends at the
    same instant are retired in task order, so the replay is deterministic.

The event loop (``hog_lane``)
    On a CPU the compute lane runs on the event-loop thread and its worker goes from one ready
    compute to the next without yielding, so while it has work nothing else is dispatched: a copy
    that ends meanwhile is seen (its successors released, its lane given a new task) only when the
    compute lane runs dry. ``hog_lane="compute"`` replays exactly that; ``None`` (CUDA lanes, whose
    host side only enqueues) sees every end at once. When the hog lane goes idle the other lanes
    choose first, then the hog lane; at a run's start the lanes' workers begin in name order, so a
    ready compute goes first and holds the loop from the start.

Started runs (``release_s``)
    :meth:`Runtime.start` lets each lane take one prefix task (tasks off the compute lane with no
    compute ancestor), then hands control to the caller, who samples for ``release_s`` seconds:
    nothing is dispatched and no end is seen until :meth:`StartedRun.finish` at ``release_s``.

Output: a :class:`Prediction` with the makespan, per-lane busy seconds and a
:class:`~pipo.runtime.program.RunStats` whose records are the predicted task intervals, so
:mod:`pipo.runtime.trace` writes the predicted Chrome trace and timeline PNG exactly as it writes
measured ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from pipo.runtime.program import Program, RunStats, TaskRecord
from pipo.runtime.tasks import Task


@dataclass(frozen=True)
class Prediction:
    """A simulated run: ``step_s`` (makespan), ``busy_s`` per lane and the predicted ``stats``."""

    step_s: float
    busy_s: dict[str, float]
    stats: RunStats

    def busy_fraction(self, lane: str) -> float:
        """Predicted busy time of ``lane`` over the step time."""
        return self.busy_s.get(lane, 0.0) / self.step_s if self.step_s else 0.0

    @property
    def bottleneck(self) -> str:
        """The lane busy longest (ties: name order); '' for an empty program."""
        if not self.busy_s:
            return ""
        return min(self.busy_s, key=lambda lane: (-self.busy_s[lane], lane))


def simulate(program: Program, duration: Callable[[Task], float], *, release_s: float = 0.0,
             hog_lane: str | None = None) -> Prediction:
    """Replay ``program`` with ``duration(task)`` seconds per task (see the module docstring)."""
    return _Replay(program, duration, release_s, hog_lane).run()


class _Replay:
    """The state of one replay: ready heaps, idle lanes, pending ends, deferred completions."""

    def __init__(self, program: Program, duration, release_s: float, hog_lane: str | None):
        p = self.p = program
        self.duration, self.release_s = duration, release_s
        self.waiting = [len(preds) for preds in p.preds]
        lanes = sorted(set(p.lanes))
        self.hog = hog_lane if hog_lane in lanes else None
        self.order = [lane for lane in lanes if lane != self.hog] + ([self.hog] if self.hog else [])
        self.ready: dict[str, list] = {lane: [] for lane in lanes}
        self.idle = set(lanes)
        self.events: list[tuple[float, int]] = []  # (end time, task index; -1: the release)
        self.deferred: list[tuple[float, int]] = []
        self.records: list[TaskRecord] = []
        self.busy = dict.fromkeys(lanes, 0.0)
        self.done = 0
        for i, count in enumerate(self.waiting):
            if count == 0:
                heapq.heappush(self.ready[p.lanes[i]], (p.priority[i], i))

    def run(self) -> Prediction:
        """Replay to the end; the :class:`Prediction`."""
        if self.release_s > 0:
            self._settle()
            heapq.heappush(self.events, (self.release_s, -1))
        else:
            self._dispatch(0.0, initial=True)
        while self.done < len(self.p.names):
            if not self.events:
                raise ValueError("simulation stalled: the program has a task that can never start")
            now, i = heapq.heappop(self.events)
            if i < 0:  # the caller hands the run back: what ended meanwhile is seen now
                self._flush(now)
            elif now < self.release_s or self._hog_holds(i):
                self.deferred.append((now, i))  # nobody drives the dispatcher at this instant
            elif self.p.lanes[i] == self.hog:
                self._complete(i)
                if self.ready[self.hog]:  # the hog lane goes straight on, holding the loop
                    self._start(self.hog, heapq.heappop(self.ready[self.hog])[1], now)
                else:
                    self._flush(now)
            else:
                self._complete(i)
                self._dispatch(now)
        step_s = max((r.end_s for r in self.records), default=0.0)
        self.records.sort(key=lambda r: (r.start_s, r.lane, r.name))
        stats = RunStats(wall_s=step_s, busy_s=dict(self.busy), records=self.records)
        return Prediction(step_s, dict(self.busy), stats)

    def _hog_holds(self, i: int) -> bool:
        """Task ``i`` (off the hog lane) ended while the hog lane holds the loop."""
        return self.hog is not None and self.p.lanes[i] != self.hog and self.hog not in self.idle

    def _settle(self) -> None:
        """A started run: each lane takes one prefix task (its best), then the caller works."""
        for lane in self.order:
            heap, held = self.ready[lane], []
            while heap and not self.p.in_prefix[heap[0][1]]:
                held.append(heapq.heappop(heap))
            if heap:
                self._start(lane, heapq.heappop(heap)[1], 0.0)
            for item in held:
                heapq.heappush(heap, item)

    def _flush(self, now: float) -> None:
        """Complete every deferred task (in end order), then dispatch."""
        deferred, self.deferred = sorted(self.deferred), []
        for _, i in deferred:
            self._complete(i)
        self._dispatch(now)

    def _dispatch(self, now: float, initial: bool = False) -> None:
        """Each idle lane with a ready task takes its best: the hog lane last, since once it runs
        it holds the loop; at a run's start the lanes' workers begin in name order."""
        for lane in sorted(self.order) if initial else self.order:
            if lane in self.idle and self.ready[lane]:
                self._start(lane, heapq.heappop(self.ready[lane])[1], now)
                if lane == self.hog:
                    return

    def _start(self, lane: str, i: int, now: float) -> None:
        self.idle.discard(lane)
        seconds = max(0.0, float(self.duration(self.p.tasks[i])))
        heapq.heappush(self.events, (now + seconds, i))
        self.busy[lane] += seconds
        self.records.append(TaskRecord(self.p.names[i], lane, now, now + seconds))

    def _complete(self, i: int) -> None:
        p = self.p
        self.done += 1
        self.idle.add(p.lanes[i])
        for s in p.succs[i]:
            self.waiting[s] -= 1
            if self.waiting[s] == 0:
                heapq.heappush(self.ready[p.lanes[s]], (p.priority[s], s))
