"""What a traced run did, as numbers, a Chrome trace and a timeline picture.

Input: :class:`~pipo.runtime.scheduler.RunStats` from ``Runtime(trace=True).run(...)``, whose
``records`` hold one :class:`~pipo.runtime.scheduler.TaskRecord` per task (name, lane, start_s,
end_s: seconds since the run started). Several steps (the engine keeps one RunStats per step) can be laid
end to end with :func:`concat_runs` first.

- :func:`chrome_trace` / :func:`write_chrome_trace`: Trace Event JSON, one named track per lane;
  open it in ``chrome://tracing`` or https://ui.perfetto.dev.
- :func:`lane_busy_fraction`: the share of the wall time a lane had work in flight (the union of its
  task intervals, so overlapping records are not counted twice).
- :func:`timeline_png`: one row per lane, one bar per task coloured by task kind.
- :func:`summary`: a plain-text table per lane: tasks, busy seconds, busy percent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from pipo.runtime.render import (KIND_COLORS, atomic_write, color_for, figure_bytes, ordered_lanes,
                                 task_label)
from pipo.runtime.scheduler import RunStats, TaskRecord

TRACE_PID = 1


def task_kind(name: str) -> str:
    """The kind of a task from its node name: ``LoadKV(0,1,0)`` -> ``LoadKV``."""
    return name.partition("(")[0]


def concat_runs(runs: Iterable[RunStats]) -> RunStats:
    """Runs laid end to end as one: each run's records shift by the wall time of those before it."""
    total = RunStats()
    for run in runs:
        for record in run.records:
            total.records.append(TaskRecord(record.name, record.lane, record.start_s + total.wall_s,
                                            record.end_s + total.wall_s))
        for lane, busy_s in run.busy_s.items():
            total.busy_s[lane] = total.busy_s.get(lane, 0.0) + busy_s
        total.wall_s += run.wall_s
    return total


def lanes_of(stats: RunStats) -> list[str]:
    """Every lane the run used, built-in lanes first."""
    return ordered_lanes(set(stats.busy_s) | {r.lane for r in stats.records})


def chrome_trace(stats: RunStats, process_name: str = "pipo step") -> dict:
    """Trace Event Format document of a traced run: one thread track (tid) per lane, named."""
    _require_records(stats)
    tids = {lane: i + 1 for i, lane in enumerate(lanes_of(stats))}
    events: list[dict] = [{"ph": "M", "pid": TRACE_PID, "name": "process_name",
                           "args": {"name": process_name}}]
    for lane, tid in tids.items():
        events.append({"ph": "M", "pid": TRACE_PID, "tid": tid, "name": "thread_name",
                       "args": {"name": lane}})
        events.append({"ph": "M", "pid": TRACE_PID, "tid": tid, "name": "thread_sort_index",
                       "args": {"sort_index": tid}})
    for record in stats.records:
        events.append({"ph": "X", "pid": TRACE_PID, "tid": tids[record.lane], "name": record.name,
                       "cat": task_kind(record.name), "ts": record.start_s * 1e6,
                       "dur": (record.end_s - record.start_s) * 1e6, "args": {"lane": record.lane}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"wall_s": stats.wall_s}}


def write_chrome_trace(stats: RunStats, path: str | os.PathLike) -> Path:
    """Write :func:`chrome_trace` as JSON to ``path`` atomically (temp file + ``os.replace``)."""
    return atomic_write(path, json.dumps(chrome_trace(stats)))


def union_s(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by ``(start, end)`` intervals, overlaps counted once."""
    covered_s, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        covered_s += end - max(start, reach)
        reach = end
    return covered_s


def lane_busy_s(stats: RunStats, lane: str) -> float:
    """Seconds ``lane`` had a task in flight: the union of its task intervals."""
    _require_records(stats)
    return union_s((r.start_s, r.end_s) for r in stats.records if r.lane == lane)


def lane_busy_fraction(stats: RunStats, lane: str) -> float:
    """:func:`lane_busy_s` over the run's wall time (0.0 for an empty run or an unused lane)."""
    return lane_busy_s(stats, lane) / stats.wall_s if stats.wall_s > 0 else 0.0


def summary(stats: RunStats) -> str:
    """A text table, one row per lane: tasks, busy seconds and busy percent of the wall time.

    Busy time is the union of task intervals for a traced run, else the runtime's own sum.
    """
    traced = bool(stats.records)
    rows = [f"{'lane':<14}{'tasks':>7}{'busy s':>11}{'busy %':>8}"]
    for lane in lanes_of(stats):
        count = sum(1 for r in stats.records if r.lane == lane) if traced else None
        busy_s = lane_busy_s(stats, lane) if traced else stats.busy_s.get(lane, 0.0)
        percent = 100.0 * busy_s / stats.wall_s if stats.wall_s > 0 else 0.0
        rows.append(f"{lane:<14}{'?' if count is None else count:>7}{busy_s:>11.4f}"
                    f"{percent:>7.1f}%")
    rows.append(f"{'wall':<14}{'':>7}{stats.wall_s:>11.4f}")
    return "\n".join(rows)


def timeline_figure(stats: RunStats, title: str | None = None):
    """A matplotlib Figure: one row per lane, one bar per task (colour: kind), time in ms."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    _require_records(stats)
    lanes = lanes_of(stats)
    width_in = 12.0
    fig = Figure(figsize=(width_in, 1.4 + 0.55 * len(lanes)), dpi=110)
    ax = fig.add_subplot()
    wall_ms = max(stats.wall_s, max((r.end_s for r in stats.records), default=0.0)) * 1e3
    ms_per_char = wall_ms * 7 * 0.6 / 72 / (width_in * 0.8)  # ~width of one 7 pt character
    for row, lane in enumerate(lanes):
        _draw_lane(ax, row, [r for r in stats.records if r.lane == lane], ms_per_char)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, wall_ms or 1.0)
    ax.set_xlabel("time since the step started (ms)")
    ax.grid(axis="x", alpha=0.3)
    seen = {task_kind(r.name) for r in stats.records}
    kinds = [k for k in KIND_COLORS if k in seen] + sorted(seen - set(KIND_COLORS))
    ax.legend(handles=[Patch(color=color_for(k, KIND_COLORS), label=k) for k in kinds],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=len(kinds), fontsize=8,
              frameon=False)
    if title:
        ax.set_title(title, loc="left", fontsize=10)
    return fig


def _draw_lane(ax, row: int, records: Sequence[TaskRecord], ms_per_char: float) -> None:
    """Bars of one lane; a bar gets its label only where the label fits inside it."""
    for r in records:
        start_ms, width_ms = r.start_s * 1e3, (r.end_s - r.start_s) * 1e3
        ax.broken_barh([(start_ms, width_ms)], (row - 0.38, 0.76),
                       facecolors=color_for(task_kind(r.name), KIND_COLORS),
                       edgecolors="white", linewidth=0.5)
        label = task_label(r.name, sep=" ").partition(" ")[2] or task_kind(r.name)
        if len(label) * ms_per_char < width_ms * 0.95:
            ax.text(start_ms + width_ms / 2, row, label, ha="center", va="center", fontsize=7,
                    color="white", clip_on=True)


def timeline_png(stats: RunStats, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write :func:`timeline_figure` as a PNG file at ``path``."""
    return atomic_write(path, figure_bytes(timeline_figure(stats, title), "png"))


def _require_records(stats: RunStats) -> None:
    if not stats.records and any(stats.busy_s.values()):
        raise ValueError("this run kept no task records: run it with Runtime(trace=True)")
