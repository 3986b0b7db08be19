"""Host overhead of pipo's own runtime per task on the CUDA path, measured on a CPU.

pipo's scheduler and CUDA lanes run on the host: for every task they pick it, make its stream wait
for its predecessors' events, enter the stream, call the executor and record an event. This script
measures that cost alone: the executors do nothing and the CUDA module is a no-op stand-in for
``torch.cuda`` (streams and events that do nothing), so what is left is pipo's Python plus the number
of stream/event calls it makes. The real driver calls add roughly 1-3 us each on a GPU machine.

Graphs: one decode step of the ``quick`` workload (OPT-1.3B shape, weights in host RAM, KV cache
offloaded, batch 8 in micro-batches of 4) and of the default model (SmolLM2-135M, batch 1, weights
in host RAM, KV offloaded), for each schedule. Columns: tasks per step, host us per task on fake CUDA
lanes (best of several batches of steps: the least disturbed by other processes), stream/event
calls per task, and host us per task on plain event-loop lanes (the scheduler alone, no stream
calls). Target: <= 20 us per task on fake CUDA lanes.

Usage: ``PYTHONPATH=. python benchmarks/bench_host_overhead.py --out host_overhead.json``
(``--quick`` for a short run, as CI does). Times vary with machine load: compare runs side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

SCHEDULES = ("pipo", "flexgen", "sequential")
TARGET_US_PER_TASK = 20.0


CALLS = [0]  # stream/event calls made, to report calls per task


class _NullStream:
    """A stream whose waits do nothing."""

    def __init__(self, device=None):
        self.device = device

    def wait_event(self, event) -> None:
        """No-op."""
        CALLS[0] += 1

    def wait_stream(self, other) -> None:
        """No-op."""
        CALLS[0] += 1


class _NullEvent:
    """An event that is always complete."""

    def __init__(self, enable_timing: bool = False):
        self.enable_timing = enable_timing
        CALLS[0] += 1

    def record(self, stream=None) -> None:
        """No-op."""
        CALLS[0] += 1

    def query(self) -> bool:
        """Always complete."""
        return True

    def synchronize(self) -> None:
        """No-op."""


class _StreamContext:
    """``with cuda.stream(s)``: a class-based context manager, like torch's."""

    def __init__(self, cuda: NullCuda, stream: _NullStream):
        self.cuda, self.stream, self.previous = cuda, stream, None

    def __enter__(self):
        self.previous, self.cuda.current = self.cuda.current, self.stream

    def __exit__(self, *exc):
        self.cuda.current = self.previous


class NullCuda:
    """The parts of ``torch.cuda`` the lanes use, doing nothing."""

    Stream = _NullStream
    Event = _NullEvent

    def __init__(self):
        self.current = _NullStream()

    def current_stream(self, device=None) -> _NullStream:
        """The stream work is enqueued on now."""
        return self.current

    def set_stream(self, stream: _NullStream) -> None:
        """Make ``stream`` current."""
        self.current = stream

    def stream(self, stream: _NullStream) -> _StreamContext:
        """Context manager making ``stream`` current."""
        return _StreamContext(self, stream)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    p.add_argument("--repeats", type=int, default=7, help="timed batches of steps (best of)")
    return p.parse_args(argv)


def step_graphs() -> list[tuple[str, object, object]]:
    """(label, spec, plan keywords) of every measured workload whose spec is available."""
    from pipo.bench.workloads import WORKLOADS

    quick = WORKLOADS["quick"]
    found = [("quick (OPT-1.3B)", quick.spec(),
              dict(batch=quick.batch, micro_batch=quick.micro_batch,
                   max_len=quick.prompt_len + quick.gen_len))]
    try:
        from pipo.io.default_model import default_model_path
        from pipo.io.gguf_file import GGUFFile

        spec = GGUFFile(default_model_path()).spec
        found.append(("default (SmolLM2-135M)", spec, dict(batch=1, micro_batch=1, max_len=256)))
    except Exception as exc:  # noqa: BLE001 - the model or gguf is optional here
        print(f"default model skipped: {exc}", file=sys.stderr)
    return found


def null_executors():
    """A table whose executors do nothing, for every built-in task kind."""
    from pipo.runtime import Compute, Executors, LoadKV, LoadWeight, ReadBlock, SaveKV

    table = Executors()
    for kind in (Compute, LoadWeight, LoadKV, SaveKV, ReadBlock):
        table.register(kind, lambda task, ctx: None)
    return table


def time_runs(lane_factory, graph, repeats: int, steps: int) -> tuple[float, float]:
    """Host microseconds per task (best of ``repeats`` batches of ``steps`` runs: the least
    disturbed by other processes) and stream/event calls per task."""
    from pipo.runtime import Runtime

    with Runtime(executors=null_executors(), lane_factory=lane_factory) as runtime:
        program = runtime.compile(graph)
        runtime.run(program)
        CALLS[0] = 0
        runtime.run(program)
        calls = CALLS[0] / len(program.names)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                runtime.run(program)
            samples.append((time.perf_counter() - t0) / steps / len(program.names) * 1e6)
    return min(samples), calls


def measure(repeats: int, steps: int) -> list[dict]:
    """One row per (workload, schedule)."""
    from graphs import DECODE, build_step
    from pipo.plan import estimate_block_nbytes, fixed_plan
    from pipo.runtime.cuda_lanes import cuda_lane
    from pipo.runtime.lanes import LoopLane

    rows = []
    for label, spec, shape in step_graphs():
        for schedule in SCHEDULES:
            plan = fixed_plan(spec, estimate_block_nbytes(spec, 2), "host", kv_offload=True,
                              schedule=schedule, **shape)
            graph = build_step(spec, plan, DECODE)
            cuda_us, calls = time_runs(partial(cuda_lane, cuda=NullCuda()), graph, repeats, steps)
            loop_us, _ = time_runs(LoopLane, graph, repeats, steps)
            rows.append({"workload": label, "schedule": schedule, "tasks": graph.number_of_nodes(),
                         "cuda_us_per_task": cuda_us, "cuda_calls_per_task": calls,
                         "loop_us_per_task": loop_us})
    return rows


def print_table(rows: list[dict]) -> None:
    """The rows as an aligned table."""
    print(f"{'workload':24} {'schedule':10} {'tasks':>6} {'fake-CUDA us/task':>18} "
          f"{'CUDA calls/task':>16} {'loop-lane us/task':>18}")
    for r in rows:
        print(f"{r['workload']:24} {r['schedule']:10} {r['tasks']:6d} {r['cuda_us_per_task']:18.1f} "
              f"{r['cuda_calls_per_task']:16.2f} {r['loop_us_per_task']:18.1f}")
    worst = max(r["cuda_us_per_task"] for r in rows)
    print(f"worst fake-CUDA host overhead {worst:.1f} us/task (target <= {TARGET_US_PER_TASK:.0f})")


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON."""
    args = parse_args(argv)
    repeats, steps = (2, 2) if args.quick else (args.repeats, 20)
    rows = measure(repeats, steps)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"bench": "host_overhead", "target_us_per_task": TARGET_US_PER_TASK, "rows": rows},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
