"""Regenerate the golden graphs (and the timeline pictures of ``docs/schedules.md``).

    python -m graphs.golden.regen                      # graphs/golden/*.json and *_decode.png
    python -m graphs.golden.regen --timelines docs/img # also the traced-run timelines

The golden setting is a tiny llama (2 layers, hidden 64) with every block streamed from host memory
and the KV cache offloaded, batch 4 split into 2 micro-batches, 2 weight slots and 2 KV slots, so
each picture shows all four task kinds and fits on a page. Review the diff of the JSON files after
regenerating: a changed edge is a changed schedule.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import networkx as nx

from graphs import SCHEDULES, build_step
from graphs.common import DECODE, PREFILL
from pipo.io.spec import ModelSpec
from pipo.plan import HOST, Plan, estimate_block_nbytes, fixed_plan
from pipo.runtime.graph import dumps_graph

GOLDEN_DIR = Path(__file__).resolve().parent
PHASES = (PREFILL, DECODE)
TIMELINE_SCHEDULES = ("sequential", "flexgen", "pipo")
FAKE_TASK_S = 0.005


def golden_spec() -> ModelSpec:
    """The tiny model every golden graph is built for."""
    return ModelSpec("llama", vocab_size=128, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=16, ffn=128, max_positions=256)


def golden_plan(schedule: str) -> Plan:
    """All blocks on the host, KV offloaded, batch 4 in micro-batches of 2, run by ``schedule``."""
    spec = golden_spec()
    return fixed_plan(spec, estimate_block_nbytes(spec, 4), HOST, batch=4, micro_batch=2,
                      max_len=64, kv_offload=True, schedule=schedule)


def golden_graph(schedule: str, phase: str) -> nx.DiGraph:
    """The step graph of ``phase`` that ``schedule`` builds for the golden plan."""
    return build_step(golden_spec(), golden_plan(schedule), phase)


def golden_path(schedule: str, phase: str, suffix: str = ".json",
                out_dir: Path = GOLDEN_DIR) -> Path:
    """Where the golden file of (``schedule``, ``phase``) lives."""
    return Path(out_dir) / f"{schedule}_{phase}{suffix}"


def regenerate(out_dir: Path = GOLDEN_DIR, pictures: bool = True) -> list[Path]:
    """Write every golden JSON file (and one decode PNG per schedule); return the paths written."""
    from pipo.runtime.render import atomic_write, graph_png

    written = []
    for schedule in SCHEDULES:
        for phase in PHASES:
            graph = golden_graph(schedule, phase)
            path = golden_path(schedule, phase, ".json", out_dir)
            written.append(atomic_write(path, dumps_graph(graph)))
            if pictures and phase == DECODE:
                png = golden_path(schedule, phase, ".png", out_dir)
                title = f"{schedule} schedule, decode step (2 layers, 2 micro-batches, streamed)"
                written.append(graph_png(graph, png, title=title))
    return written


def traced_fake_run(schedule: str, task_s: float = FAKE_TASK_S):
    """Run the golden decode graph of ``schedule`` with every task a ``task_s`` sleep, traced.

    Every lane is a worker thread, so loads, KV traffic and compute really overlap where the graph
    allows it. Returns the :class:`~pipo.runtime.scheduler.RunStats` of the second of two runs of
    one compiled program, so that starting the lane threads is not in the picture.
    """
    from pipo.runtime import Executors, Runtime, ThreadLane
    from pipo.runtime.tasks import Compute, LoadKV, LoadWeight, SaveKV

    table = Executors()
    for kind in (Compute, LoadKV, LoadWeight, SaveKV):
        table.register(kind, lambda task, ctx: time.sleep(task_s))
    with Runtime(executors=table, lane_factory=ThreadLane, trace=True) as runtime:
        program = runtime.compile(golden_graph(schedule, DECODE))
        runtime.run(program)
        return runtime.run(program)


def write_timelines(out_dir: Path) -> dict[str, str]:
    """Timeline PNGs of fake 5 ms tasks for each timeline schedule; returns their summaries."""
    from pipo.runtime.trace import summary, timeline_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for schedule in TIMELINE_SCHEDULES:
        stats = traced_fake_run(schedule)
        title = (f"{schedule}: decode step, every task a {FAKE_TASK_S * 1e3:.0f} ms sleep, "
                 f"wall {stats.wall_s * 1e3:.0f} ms")
        timeline_png(stats, out_dir / f"timeline_{schedule}.png", title=title)
        summaries[schedule] = summary(stats)
    return summaries


def main(argv: list[str] | None = None) -> None:
    """Command line: regenerate the golden files, optionally the doc timelines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GOLDEN_DIR, help="golden folder")
    parser.add_argument("--timelines", type=Path, help="also write timeline PNGs into this folder")
    args = parser.parse_args(argv)
    for path in regenerate(args.out):
        print(f"wrote {path}")
    if args.timelines:
        for schedule, table in write_timelines(args.timelines).items():
            print(f"\n{schedule}\n{table}")


if __name__ == "__main__":
    main()
