"""One decode step's timeline: host task records on CPU, CUDA event times on a GPU.

The engine (``EngineOptions(trace=True)``) keeps one :class:`~pipo.runtime.scheduler.RunStats` per
step, with host-side start/end per task. On CUDA lanes the host only *enqueues* work, so those times
say when a task was issued, not when the GPU ran it; the GPU times come from the lanes' timing events
(:mod:`pipo.runtime.cuda_lanes`). A lane runs its tasks in the order the host issued them, so within
one run (the lanes tag each timed interval with ``RunStats.run_id``) the k-th timed interval of a
lane belongs to the k-th record of that lane.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipo.runtime.scheduler import RunStats, TaskRecord
from pipo.runtime.trace import timeline_png, write_chrome_trace


def gpu_step_stats(host: RunStats, timed_lanes: dict) -> RunStats:
    """``host``'s records with GPU times where its run was timed.

    ``timed_lanes`` maps lane name -> CUDA lane whose ``timed`` list holds (start, end) events of
    every timed task in issue order and ``timed_runs`` the run id of each. A lane whose timed
    tasks of this run do not match its records one to one (timing was switched on mid-run) keeps
    its host times. Times are seconds since the step's earliest GPU start.
    """
    counts = Counter(r.lane for r in host.records)
    events = {}
    for name, lane in timed_lanes.items():
        pairs = [p for p, run in zip(lane.timed, lane.timed_runs) if run == host.run_id]
        if len(pairs) == counts.get(name, 0):
            events[name] = pairs
    starts = [pair[0] for pairs in events.values() for pair in pairs]
    if not starts:
        return host
    for pairs in events.values():
        if pairs:
            pairs[-1][1].synchronize()
    reference = min(starts, key=lambda e: starts[0].elapsed_time(e))
    cursor = Counter()
    records = []
    for record in host.records:
        pairs = events.get(record.lane)
        if not pairs:
            records.append(record)
            continue
        start, end = pairs[cursor[record.lane]]
        cursor[record.lane] += 1
        records.append(TaskRecord(record.name, record.lane, reference.elapsed_time(start) / 1e3,
                                  reference.elapsed_time(end) / 1e3))
    wall_s = max(r.end_s for r in records)
    busy = Counter()
    for r in records:
        busy[r.lane] += r.end_s - r.start_s
    return RunStats(wall_s=wall_s, busy_s=dict(busy), records=records, run_id=host.run_id)


def write_step_trace(stats: RunStats, out_dir: str | Path, label: str) -> dict[str, str]:
    """Chrome trace JSON and timeline PNG of one step under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_chrome_trace(stats, out / f"trace_{label}.json")
    paths = {"chrome_trace": str(json_path)}
    try:
        png = timeline_png(stats, out / f"timeline_{label}.png", title=f"{label}: one decode step")
        paths["timeline_png"] = str(png)
    except ImportError:  # matplotlib missing: the JSON is still useful
        pass
    return paths
