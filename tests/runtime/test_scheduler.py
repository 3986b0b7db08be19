"""Runtime tier: the scheduler on CPU lanes with fake executors (no torch).

Covers the policy (critical path first, then program order), dependencies and slot reuse in real
concurrent runs, failure handling (cancel, re-raise with a note, reuse afterwards), Program reuse,
lane rules, and compile-time errors.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from dataclasses import dataclass

import networkx as nx
import pytest

from graphs import build_step
from graphs.golden.regen import golden_plan, golden_spec
from pipo.plan import estimate_block_nbytes, fixed_plan
from pipo.runtime import Executors, GraphBuilder, LoopLane, Runtime, Task, ThreadLane
from pipo.runtime.tasks import COMPUTE
from tests.runtime.toy import (Step, ToyContext, assert_step_done, hanging_step, step_ctx,
                               step_table, toy_executors)

SPEC = golden_spec()


def _steps(edges: list[tuple[str, str]], labels: str, lanes: dict | None = None) -> nx.DiGraph:
    """A graph of Step tasks in program order ``labels`` with ``after`` edges."""
    b = GraphBuilder()
    names = {}
    for label in labels:
        preds = [names[src] for src, dst in edges if dst == label]
        names[label] = b.add(Step(label, lane=(lanes or {}).get(label, COMPUTE)), after=preds)
    return b.graph


@pytest.fixture(scope="module")
def threaded():
    """One runtime, every lane a worker thread (the most concurrency CPU lanes give)."""
    with Runtime(executors=toy_executors(), lane_factory=ThreadLane, trace=True) as runtime:
        yield runtime


def _plan(schedule, tier="host", kv=True, micro_batch=2, n_weight_slots=2, n_kv_slots=2):
    return fixed_plan(SPEC, estimate_block_nbytes(SPEC, 4), tier, batch=4, micro_batch=micro_batch,
                      max_len=64, kv_offload=kv, schedule=schedule, n_weight_slots=n_weight_slots,
                      n_kv_slots=n_kv_slots)


def _run_toy(runtime: Runtime, graph_or_program, phase: str, n_micro: int, delay_s=0.001):
    ctx = ToyContext(SPEC.block_names(), phase, delay_s)
    stats = runtime.run(graph_or_program, ctx)
    assert_step_done(ctx, n_micro)
    return ctx, stats


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("tier,kv", [("host", True), ("disk", False), ("resident", True)])
@pytest.mark.parametrize("schedule", ["sequential", "pipo", "flexgen"])
def test_every_task_sees_its_inputs_and_runs_after_its_predecessors(threaded, schedule, tier, kv,
                                                                    phase):
    graph = build_step(SPEC, _plan(schedule, tier, kv), phase)
    ctx, stats = _run_toy(threaded, graph, phase, n_micro=2)
    assert sorted(ctx.started) == sorted(graph)
    position = {name: i for i, name in enumerate(ctx.started)}
    record = {r.name: r for r in stats.records}
    for src, dst in graph.edges:
        assert position[src] < position[dst], (src, dst)
        assert record[src].end_s <= record[dst].start_s, (src, dst)


@pytest.mark.parametrize("n_weight_slots,n_kv_slots", [(1, 1), (2, 2), (3, 2)])
@pytest.mark.parametrize("schedule", ["sequential", "pipo"])
def test_slots_are_refilled_only_after_their_last_reader(threaded, schedule, n_weight_slots,
                                                         n_kv_slots):
    plan = _plan(schedule, micro_batch=1, n_weight_slots=n_weight_slots, n_kv_slots=n_kv_slots)
    _run_toy(threaded, build_step(SPEC, plan, "decode"), "decode", n_micro=4, delay_s=0.0005)


def test_the_toy_executors_notice_a_slot_refilled_too_early(threaded, monkeypatch):
    """The check above has teeth: invert one slot-reuse edge and the run fails."""
    graph = nx.DiGraph(build_step(SPEC, golden_plan("pipo"), "decode"))
    graph.remove_edge("Compute(embed,1,0,-)", "LoadWeight(L0.mlp,0)")
    graph.add_edge("LoadWeight(L0.mlp,0)", "Compute(embed,1,0,-)")
    monkeypatch.setattr("pipo.runtime.scheduler.check_graph", lambda graph, executors: None)
    program = threaded.compile(graph)  # check_graph would refuse this graph
    with pytest.raises(AssertionError, match="weight slot holds L0.mlp"):
        _run_toy(threaded, program, "decode", n_micro=2)


def test_priority_is_critical_path_first_then_program_order():
    # program order a b c d e; b -> c -> d is the longest chain; all on one lane
    graph = _steps([("b", "c"), ("c", "d")], "abcde")
    with Runtime(executors=step_table(), lane_factory=LoopLane) as runtime:
        ctx = step_ctx()
        runtime.run(graph, ctx)
    assert ctx.ran == ["b", "c", "a", "d", "e"]


def test_equal_depth_keeps_program_order_per_lane():
    graph = _steps([], "zyx", lanes={"z": "one", "y": "one", "x": "one"})
    with Runtime(executors=step_table(), lane_factory=LoopLane) as runtime:
        ctx = step_ctx()
        runtime.run(graph, ctx)
    assert ctx.ran == ["z", "y", "x"]


class Boom(RuntimeError):
    """A distinctive exception type, to check the runtime re-raises the original."""


@pytest.mark.timeout(10)
def test_a_failure_cancels_a_hanging_task_on_another_lane_and_reraises_with_a_note():
    cancelled = []

    async def boom(task, ctx):
        await asyncio.sleep(0.01)  # the hanging task has started by now
        raise Boom("disk on fire")

    graph = _steps([("boom", "after")], ["boom", "hang", "after"],
                   lanes={"boom": "compute", "hang": "slow", "after": "compute"})
    with Runtime(executors=step_table(), lane_factory=LoopLane) as runtime:
        ctx = step_ctx(boom=boom, hang=hanging_step(cancelled))
        with pytest.raises(Boom, match="disk on fire") as info:
            runtime.run(graph, ctx)
        assert "while running task Step(boom) on lane compute" in info.value.__notes__
        assert cancelled == ["hang"] and ctx.ran == []
        ok = step_ctx()
        runtime.run(_steps([("a", "b")], "ab", lanes={"a": "slow"}), ok)  # reusable afterwards
        assert ok.ran == ["a", "b"]


@pytest.mark.timeout(10)
def test_a_failure_on_a_thread_lane_keeps_its_type_and_the_lane_stays_usable():
    def fail(task, ctx):
        raise Boom("copy failed")

    graph = _steps([("a", "fail"), ("fail", "z")], ["a", "fail", "z"],
                   lanes={"a": "copy", "fail": "copy", "z": "copy"})
    with Runtime(executors=step_table(), lane_factory=ThreadLane) as runtime:
        ctx = step_ctx(fail=fail)
        with pytest.raises(Boom) as info:
            runtime.run(graph, ctx)
        assert info.value.__notes__ == ["while running task Step(fail) on lane copy"]
        assert ctx.ran == ["a"]
        for _ in range(3):
            again = step_ctx()
            runtime.run(graph, again)
            assert again.ran == ["a", "fail", "z"]


def test_a_program_is_compiled_once_and_reused_for_many_runs(threaded):
    graph = build_step(SPEC, golden_plan("pipo"), "decode")
    program = threaded.compile(graph)
    assert nx.is_frozen(program.graph) and not nx.is_frozen(graph)
    graph.add_node("extra")  # the program kept its own copy
    assert "extra" not in program.graph and len(program.names) == len(program.graph)
    for _ in range(30):
        ctx, stats = _run_toy(threaded, program, "decode", n_micro=2, delay_s=0.0)
        assert len(stats.records) == len(program.names)
        assert sorted(ctx.started) == sorted(program.names)


def test_an_async_executor_runs_on_a_loop_lane():
    async def wait(task, ctx):
        await asyncio.sleep(0)
        ctx.ran.append("awaited")

    with Runtime(executors=step_table(), lane_factory=LoopLane) as runtime:
        ctx = step_ctx(a=wait)
        runtime.run(_steps([("a", "b")], "ab"), ctx)
    assert ctx.ran == ["awaited", "b"]


def test_a_thread_lane_rejects_an_async_executor_clearly_and_closes_the_coroutine():
    async def wait(task, ctx):
        await asyncio.sleep(0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime = Runtime(executors=step_table(), lane_factory=ThreadLane)
        with pytest.raises(TypeError, match="lane compute runs only synchronous executors") as info:
            runtime.run(_steps([], "a"), step_ctx(a=wait))
        assert info.value.__notes__ == ["while running task Step(a) on lane compute"]
        del info
        runtime.close()
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_an_unknown_task_kind_fails_at_compile_with_the_registry_message():
    @dataclass(frozen=True, slots=True)
    class Mystery(Task):
        tag: str

    b = GraphBuilder()
    b.add(Mystery("x"))
    with Runtime(executors=Executors().child()) as runtime:
        with pytest.raises(Exception) as info:
            runtime.compile(b.graph)
    assert "no executor registered for task kind Mystery" in str(info.value)
    assert "register one with @executor(Mystery)" in str(info.value)
    assert runtime.lanes == {}  # nothing started


def test_stats_without_trace_and_an_empty_graph():
    with Runtime(executors=step_table(), lane_factory=LoopLane) as runtime:
        stats = runtime.run(_steps([], "ab", lanes={"b": "other"}), step_ctx())
        assert stats.records == [] and set(stats.busy_s) == {"compute", "other"}
        assert 0 <= stats.busy_fraction("compute") <= 1 and stats.busy_fraction("nope") == 0
        assert set(runtime.lanes) == {"compute", "other"}
        empty = runtime.run(nx.DiGraph())
        assert empty.records == [] and empty.busy_s == {}
    runtime.close()  # idempotent
