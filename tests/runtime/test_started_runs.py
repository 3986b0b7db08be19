"""Runtime tier: started runs (``Runtime.start`` / ``finish`` / ``cancel``) and interrupts.

A started run releases only its prefix (tasks with no compute-lane task at or above them), leaves
thread-lane work in flight while the caller works, and runs the rest on ``finish``. An interrupt
(``KeyboardInterrupt``) anywhere in a run cancels and awaits every worker, drains thread lanes and
re-raises, leaving no pending asyncio task behind.
"""

from __future__ import annotations

import asyncio
import threading

import networkx as nx
import pytest

from graphs import build_step
from graphs.golden.regen import golden_plan, golden_spec
from pipo.runtime import GraphBuilder, LoopLane, Runtime, ThreadLane
from pipo.runtime.tasks import COMPUTE, LOAD_KV, LOAD_WEIGHT, SAVE_KV
from tests.runtime.toy import Step, hanging_step, log_step, step_ctx, step_table, toy_executors

LABELS = ["load", "kv", "compute", "reload", "save"]


def _graph() -> nx.DiGraph:
    """load -> compute -> reload; kv (a root) -> compute; save after compute."""
    b = GraphBuilder()
    load = b.add(Step("load", lane=LOAD_WEIGHT))
    kv = b.add(Step("kv", lane=LOAD_KV))
    compute = b.add(Step("compute", lane=COMPUTE), after=[load, kv])
    b.add(Step("reload", lane=LOAD_WEIGHT), after=[compute])
    b.add(Step("save", lane=SAVE_KV), after=[compute])
    return b.graph


def test_the_prefix_is_every_task_without_a_compute_task_at_or_above_it():
    graph = build_step(golden_spec(), golden_plan("pipo"), "decode")
    with Runtime(executors=toy_executors()) as runtime:
        program = runtime.compile(graph)
    prefix = {n for n, inside in zip(program.names, program.in_prefix) if inside}
    for name in graph:
        above = nx.ancestors(graph, name) | {name}
        assert (name in prefix) == all(graph.nodes[a]["task"].lane != COMPUTE for a in above)
    assert "LoadWeight(embed,0)" in prefix and "LoadKV(0,0,0)" in prefix
    assert {program.names[i] for i in program.frontier} == {
        n for n in graph if n not in prefix and set(graph.predecessors(n)) <= prefix}
    assert {program.names[i] for i in program.sinks} == {n for n in graph if not graph.out_degree(n)}


@pytest.mark.timeout(20)
def test_a_started_run_leaves_thread_work_in_flight_while_the_caller_works():
    gate = threading.Event()

    def load(task, ctx):
        ctx.load_saw_gate = gate.wait(10)  # set by the caller between start and finish
        log_step(task, ctx)

    with Runtime(executors=step_table(), lane_factory=ThreadLane) as runtime:
        ctx = step_ctx(load=load)
        started = runtime.start(_graph(), ctx)
        assert "compute" not in ctx.ran and "load" not in ctx.ran  # in flight, not done
        gate.set()  # the caller's own work (e.g. sampling) happens here
        stats = started.finish()
    assert ctx.load_saw_gate
    assert ctx.ran.index("compute") > max(ctx.ran.index("load"), ctx.ran.index("kv"))
    assert sorted(ctx.ran) == sorted(LABELS) and stats.wall_s > 0


def test_finish_runs_the_rest_after_the_caller_and_cancel_runs_only_the_prefix():
    with Runtime(executors=step_table(), lane_factory=LoopLane) as runtime:
        program = runtime.compile(_graph())
        ctx = step_ctx()
        started = runtime.start(program, ctx)
        ctx.ran.append("caller")
        started.finish()
        assert set(ctx.ran[:ctx.ran.index("caller")]) <= {"load", "kv"}
        assert sorted(ctx.ran) == sorted(["caller", *LABELS])
        cancelled = step_ctx()
        runtime.start(program, cancelled).cancel()
        assert sorted(cancelled.ran) == ["kv", "load"]
        again = step_ctx()
        runtime.run(program, again)  # reusable afterwards
        assert sorted(again.ran) == sorted(LABELS)


def test_one_run_at_a_time_and_a_started_run_finishes_once():
    with Runtime(executors=step_table(), lane_factory=LoopLane) as runtime:
        started = runtime.start(_graph(), step_ctx())
        with pytest.raises(RuntimeError, match="still pending"):
            runtime.run(_graph(), step_ctx())
        started.finish()
        with pytest.raises(RuntimeError, match="already finished"):
            started.finish()


def test_a_failing_prefix_task_raises_by_finish_and_the_runtime_stays_usable():
    def fail(task, ctx):
        raise ValueError("disk on fire")

    with Runtime(executors=step_table(), lane_factory=LoopLane) as runtime:
        with pytest.raises(ValueError, match="disk on fire") as info:
            runtime.start(_graph(), step_ctx(kv=fail)).finish()
        assert info.value.__notes__ == ["while running task Step(kv) on lane load_kv"]
        ok = step_ctx()
        runtime.run(_graph(), ok)
        assert len(ok.ran) == 5


@pytest.mark.timeout(20)
@pytest.mark.parametrize("when", ["run", "finish"])
def test_an_interrupt_cancels_every_worker_drains_threads_and_reraises(when):
    copy_done = threading.Event()
    cancelled = []

    def slow_copy(task, ctx):  # on a thread lane: in flight when the interrupt comes
        copy_done.wait(0.2)
        copy_done.set()

    async def interrupt(task, ctx):
        await asyncio.sleep(0.01)
        raise KeyboardInterrupt

    b = GraphBuilder()
    b.add(Step("copy", lane="copy"))
    b.add(Step("hang", lane="slow"))
    b.add(Step("boom", lane=COMPUTE))
    lanes = {"copy": ThreadLane}
    with Runtime(executors=step_table(), lane_factory=lambda n: lanes.get(n, LoopLane)(n)) as runtime:
        ctx = step_ctx(copy=slow_copy, hang=hanging_step(cancelled), boom=interrupt)
        with pytest.raises(KeyboardInterrupt):
            if when == "run":
                runtime.run(b.graph, ctx)
            else:
                runtime.start(b.graph, ctx).finish()
        assert copy_done.is_set()  # drained before the interrupt reached the caller
        assert cancelled == ["hang"]
        assert not asyncio.all_tasks(runtime._loop)  # nothing left pending to be destroyed
        ok = step_ctx()
        runtime.run(_graph(), ok)
        assert len(ok.ran) == 5
