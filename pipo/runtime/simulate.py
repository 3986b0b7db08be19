"""Replay a compiled step graph on a virtual clock: the scheduler's policy with predicted durations.

:func:`simulate` runs a :class:`~pipo.runtime.program.Program` (the same object the runtime runs)
without executing anything. It knows only task kinds, edges, lanes and a ``duration(task) ->
seconds`` function, so it is model-agnostic; the planner supplies durations from a measured
machine profile (:mod:`pipo.planner.costs`).

Policy (the scheduler's, :mod:`pipo.runtime.scheduler`)
    A task is ready when every predecessor finished. Each lane runs one task at a time; when a lane
    is idle it takes its ready task of highest priority (the Program's precomputed priority: longest
    path to the end, then program order). Time advances from one task end to the next; every task
    that ends at the same instant is retired before idle lanes choose again (ties between ends are
    retired in task order), so the replay is deterministic.

Started runs
    ``release_s`` models :meth:`Runtime.start` / :meth:`StartedRun.finish`: the prefix (tasks off
    the compute lane with no compute ancestor) may start at 0, everything else no earlier than
    ``release_s`` (the caller's sampling time between two decode steps).

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


def simulate(program: Program, duration: Callable[[Task], float], *,
             release_s: float = 0.0) -> Prediction:
    """Replay ``program`` with ``duration(task)`` seconds per task (see the module docstring)."""
    p = program
    n = len(p.names)
    waiting = [len(preds) for preds in p.preds]
    lanes = sorted(set(p.lanes))
    ready: dict[str, list] = {lane: [] for lane in lanes}
    idle = set(lanes)
    events: list[tuple[float, int]] = []  # (end time, task index)
    records: list[TaskRecord] = []
    busy = {lane: 0.0 for lane in lanes}
    for i in range(n):
        if waiting[i] == 0:
            heapq.heappush(ready[p.lanes[i]], (p.priority[i], i))
    now, done = 0.0, 0
    while done < n:
        _dispatch(p, ready, idle, events, records, busy, duration, now, release_s)
        if not events:
            raise ValueError("simulation stalled: the program has a task that can never start")
        now = events[0][0]
        while events and events[0][0] == now:
            _, i = heapq.heappop(events)
            if i < 0:  # the release wake-up: held tasks may start now
                continue
            done += 1
            idle.add(p.lanes[i])
            for s in p.succs[i]:
                waiting[s] -= 1
                if waiting[s] == 0:
                    heapq.heappush(ready[p.lanes[s]], (p.priority[s], s))
    step_s = max((r.end_s for r in records), default=0.0)
    records.sort(key=lambda r: (r.start_s, r.lane, r.name))
    stats = RunStats(wall_s=step_s, busy_s=dict(busy), records=records)
    return Prediction(step_s, dict(busy), stats)


def _dispatch(p, ready, idle, events, records, busy, duration, now, release_s) -> None:
    """Every idle lane with a ready task it may start now takes its highest-priority one.

    A held task (outside the prefix, before ``release_s``) blocks nothing: the lane takes its best
    task that may start; if none may, it waits and a wake-up event at ``release_s`` is queued.
    """
    for lane in sorted(idle):
        heap = ready[lane]
        if not heap:
            continue
        i = _pick(p, heap, now, release_s)
        if i is None:
            if not any(t == release_s and j < 0 for t, j in events):
                heapq.heappush(events, (release_s, -1 - len(events)))
            continue
        idle.discard(lane)
        seconds = max(0.0, float(duration(p.tasks[i])))
        end = now + seconds
        heapq.heappush(events, (end, i))
        busy[lane] += seconds
        records.append(TaskRecord(p.names[i], lane, now, end))


def _pick(p: Program, heap: list, now: float, release_s: float) -> int | None:
    """Pop the best task of ``heap`` that may start at ``now`` (held tasks stay in the heap)."""
    if now >= release_s:
        return heapq.heappop(heap)[1]
    held = []
    chosen = None
    while heap:
        item = heapq.heappop(heap)
        if p.in_prefix[item[1]]:
            chosen = item[1]
            break
        held.append(item)
    for item in held:
        heapq.heappush(heap, item)
    return chosen
