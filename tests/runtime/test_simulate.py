"""The virtual-clock replay on hand-made graphs whose timelines are worked out by hand (in µs)."""

from __future__ import annotations

from itertools import pairwise

import pytest

from graphs import build_step
from graphs.golden.regen import golden_spec
from pipo.plan import estimate_block_nbytes, fixed_plan
from pipo.runtime import Compute, GraphBuilder, LoadWeight
from pipo.runtime.program import compile_program
from pipo.runtime.simulate import simulate
from pipo.runtime.tasks import COMPUTE, LOAD_WEIGHT
from tests.runtime.toy import Step, step_table, toy_executors

US = 1e-6


def _program(graph):
    return compile_program(graph, toy_executors(step_table()))


def _timeline(prediction) -> dict[str, tuple[int, int]]:
    """Task name -> (start µs, end µs), rounded to the microsecond."""
    return {r.name: (round(r.start_s / US), round(r.end_s / US)) for r in prediction.stats.records}


def _streamed(n_blocks: int, n_slots: int):
    """LoadWeight/Compute pairs over ``n_slots`` weight slots; slot reuse from the accesses."""
    b = GraphBuilder()
    for i in range(n_blocks):
        block, slot = f"b{i}", i % n_slots
        b.add(LoadWeight(block, slot), writes=[("w", slot, block)])
        reads = [("w", slot, block)] + ([("act", 0, f"b{i - 1}")] if i else [])
        b.add(Compute(block, 0, slot), reads=reads, writes=[("act", 0, block)])
    return _program(b.graph)


def _by_kind(load_us: int, compute_us: int):
    return lambda task: (load_us if isinstance(task, LoadWeight) else compute_us) * US


def test_a_chain_runs_back_to_back():
    b = GraphBuilder()
    a = b.add(Step("a"))
    c = b.add(Step("c"), after=[a])
    b.add(Step("d"), after=[c])
    us = {"a": 1000, "c": 2000, "d": 3000}
    pred = simulate(_program(b.graph), lambda t: us[t.label] * US)
    assert _timeline(pred) == {"Step(a)": (0, 1000), "Step(c)": (1000, 3000),
                               "Step(d)": (3000, 6000)}
    assert pred.step_s == pytest.approx(6000 * US, abs=1e-12)
    assert pred.busy_fraction(COMPUTE) == pytest.approx(1.0)


def test_two_lanes_overlap_and_the_load_lane_is_the_bottleneck():
    pred = simulate(_streamed(2, 2), _by_kind(2000, 1000))
    assert _timeline(pred) == {
        "LoadWeight(b0,0)": (0, 2000), "LoadWeight(b1,1)": (2000, 4000),
        "Compute(b0,0,0,-)": (2000, 3000), "Compute(b1,0,1,-)": (4000, 5000)}
    assert round(pred.step_s / US) == 5000
    assert pred.bottleneck == LOAD_WEIGHT
    assert pred.busy_fraction(LOAD_WEIGHT) == pytest.approx(0.8)
    assert pred.busy_fraction(COMPUTE) == pytest.approx(0.4)


@pytest.mark.parametrize("n_slots,step_us", [(1, 16000), (2, 13000), (3, 13000)])
def test_slots_limit_the_look_ahead(n_slots, step_us):
    """Loads 1 ms, computes 3 ms, four blocks: one slot serializes everything (4 × 4 ms); with
    two the next load hides behind the compute, but a refill still waits for its slot's reader."""
    pred = simulate(_streamed(4, n_slots), _by_kind(1000, 3000))
    assert round(pred.step_s / US) == step_us
    if n_slots == 2:
        got = _timeline(pred)
        assert got["LoadWeight(b2,0)"] == (4000, 5000)  # slot 0 frees when compute b0 ends
        assert got["LoadWeight(b3,1)"] == (7000, 8000)
        assert got["Compute(b3,0,1,-)"] == (10000, 13000)


def test_a_lane_takes_the_critical_path_first():
    """x and y are ready together on one lane; y heads the longer path, so it goes first."""
    b = GraphBuilder()
    b.add(Step("x"))
    y = b.add(Step("y"))
    b.add(Step("z", lane=LOAD_WEIGHT), after=[y])
    got = _timeline(simulate(_program(b.graph), lambda t: 1000 * US))
    assert got == {"Step(y)": (0, 1000), "Step(x)": (1000, 2000), "Step(z)": (1000, 2000)}


def test_a_started_run_takes_one_prefix_task_per_lane_then_waits_for_the_caller():
    """Runtime.start: each lane takes one prefix task, then the host samples for 2.5 ms; the
    second load (also prefix) waits for finish() like everything else."""
    pred = simulate(_streamed(2, 2), _by_kind(2000, 1000), release_s=2500 * US)
    got = _timeline(pred)
    assert got["LoadWeight(b0,0)"] == (0, 2000)  # goes ahead while the caller samples
    assert got["LoadWeight(b1,1)"] == (2500, 4500)
    assert got["Compute(b0,0,0,-)"] == (2500, 3500)
    assert round(pred.step_s / US) == 5500


def test_the_loop_lane_holds_the_dispatcher_while_it_has_work():
    """CPU compute runs on the event loop: two ready 3 ms computes run back to back and the
    copy lane gets its chain (two 1 ms loads) only when compute runs dry."""
    b = GraphBuilder()
    b.add(Step("c1"))
    b.add(Step("c2"))
    first = b.add(Step("l1", lane=LOAD_WEIGHT))
    b.add(Step("l2", lane=LOAD_WEIGHT), after=[first])
    program = _program(b.graph)
    us = {"c1": 3000, "c2": 3000, "l1": 1000, "l2": 1000}
    free = _timeline(simulate(program, lambda t: us[t.label] * US))
    held = _timeline(simulate(program, lambda t: us[t.label] * US, hog_lane=COMPUTE))
    assert free["Step(l2)"] == (1000, 2000)
    assert held["Step(c1)"] == (0, 3000) and held["Step(c2)"] == (3000, 6000)
    assert held["Step(l1)"] == (6000, 7000) and held["Step(l2)"] == (7000, 8000)


def test_an_end_seen_late_delays_its_successors_until_the_loop_is_free():
    """A load ends at 1 ms while compute a (0-3 ms) holds the loop: its successor (compute b)
    and the next load start only at 3 ms."""
    b = GraphBuilder()
    b.add(Step("a"))
    load = b.add(Step("l1", lane=LOAD_WEIGHT))
    b.add(Step("b"), after=[load])
    b.add(Step("l2", lane=LOAD_WEIGHT), after=[load])
    us = {"a": 3000, "b": 1000, "l1": 1000, "l2": 1000}
    got = _timeline(simulate(_program(b.graph), lambda t: us[t.label] * US, hog_lane=COMPUTE))
    assert got["Step(a)"] == (0, 3000)
    assert got["Step(l1)"] == (3000, 4000)  # compute took the loop first at t=0
    assert got["Step(l2)"] == (4000, 5000) and got["Step(b)"] == (4000, 5000)


def test_a_real_step_graph_replays_with_every_task_once():
    spec = golden_spec()
    plan = fixed_plan(spec, estimate_block_nbytes(spec, 4), "host", batch=4, micro_batch=2,
                      max_len=32, kv_offload=True)
    program = _program(build_step(spec, plan, "decode"))
    pred = simulate(program, lambda t: 10 * US)
    assert sorted(r.name for r in pred.stats.records) == sorted(program.names)
    for lane in set(program.lanes):
        spans = sorted((r.start_s, r.end_s) for r in pred.stats.records if r.lane == lane)
        assert all(a[1] <= b[0] + 1e-15 for a, b in pairwise(spans))  # one at a time
    assert pred == simulate(program, lambda t: 10 * US)  # deterministic
