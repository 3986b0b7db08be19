"""Graph tier: every schedule builds valid step graphs, each with the structure its name promises.

- sequential: a total order (exactly one topological order: no two tasks may overlap);
- pipo: block k+1's weights may load while block k computes (no path between them), KV loads beside
  weight loads, KV saves beside the next MLP, no barrier;
- flexgen: a barrier after every (block, micro-batch) step, the next block's load overlapping only
  the first micro-batch's compute;
- all: each streamed block loaded exactly once per step and read by every micro-batch; KV traffic
  once per (layer, micro-batch).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import networkx as nx
import pytest

from graphs import SCHEDULES, build_step
from graphs.golden.regen import golden_spec
from pipo.errors import PlanError
from pipo.plan import PLACEMENTS, RESIDENT, estimate_block_nbytes, fixed_plan
from pipo.runtime import Compute, LoadKV, LoadWeight, SaveKV, check_graph
from pipo.runtime.tasks import DISK, LOAD_WEIGHT

SPEC = golden_spec()
SIZES = estimate_block_nbytes(SPEC, 4)
PHASES = ("prefill", "decode")
CASES = list(itertools.product(SCHEDULES, PLACEMENTS, (False, True), PHASES))


def _plan(schedule, tier="host", kv=True, micro_batch=2, n_weight_slots=2, n_kv_slots=2):
    return fixed_plan(SPEC, SIZES, tier, batch=4, micro_batch=micro_batch, max_len=64,
                      kv_offload=kv, schedule=schedule, n_weight_slots=n_weight_slots,
                      n_kv_slots=n_kv_slots)


def _graph(schedule, tier="host", kv=True, phase="decode", **plan_args) -> nx.DiGraph:
    return build_step(SPEC, _plan(schedule, tier, kv, **plan_args), phase)


def _tasks(graph: nx.DiGraph, kind: type) -> list:
    return [graph.nodes[n]["task"] for n in graph if type(graph.nodes[n]["task"]) is kind]


def test_graphs_plans_and_rendering_never_import_torch():
    code = textwrap.dedent("""
        import sys
        import graphs, pipo.plan, pipo.runtime, pipo.runtime.graph, pipo.runtime.render
        import pipo.runtime.trace
        from graphs.golden.regen import golden_graph
        from pipo.runtime.render import to_dot
        for schedule in graphs.SCHEDULES:
            pipo.runtime.check_graph(golden_graph(schedule, "decode"))
            to_dot(golden_graph(schedule, "prefill"))
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("schedule,tier,kv,phase", CASES)
def test_every_schedule_placement_and_phase_passes_check_graph(schedule, tier, kv, phase):
    graph = _graph(schedule, tier, kv, phase)
    check_graph(graph)
    assert len(_tasks(graph, Compute)) == len(SPEC.block_names()) * 2


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_slot_count_gives_a_valid_graph_or_a_plan_error(schedule):
    """Slot counts a user may ask for: the builder must refuse clearly or build a valid graph."""
    invalid = []
    for micro_batch, n_weight_slots, n_kv_slots, phase in itertools.product(
            (1, 2, 4), (2, 3, 1), (2, 3, 1), PHASES):  # default slot counts first
        shape = dict(micro_batch=micro_batch, n_weight_slots=n_weight_slots, n_kv_slots=n_kv_slots)
        try:
            graph = _graph(schedule, "host", True, phase, **shape)
        except PlanError:
            continue
        try:
            check_graph(graph)
        except ValueError as exc:
            invalid.append(f"{phase} {shape}: {str(exc).splitlines()[1].strip()}")
    assert not invalid, f"{len(invalid)} invalid {schedule} graphs, e.g.\n" + "\n".join(invalid[:4])


@pytest.mark.parametrize("tier,kv,phase", list(itertools.product(PLACEMENTS, (False, True),
                                                                 PHASES)))
def test_sequential_is_a_total_order(tier, kv, phase):
    graph = _graph("sequential", tier, kv, phase)
    order = list(nx.topological_sort(graph))
    assert all(graph.has_edge(a, b) for a, b in zip(order, order[1:]))


def _compute_names(graph: nx.DiGraph, block: str) -> list[str]:
    return [t.name for t in _tasks(graph, Compute) if t.block == block]


def _load_name(graph: nx.DiGraph, block: str) -> str:
    (name,) = [t.name for t in _tasks(graph, LoadWeight) if t.block == block]
    return name


@pytest.mark.parametrize("tier,kv,phase", list(itertools.product(("host", "disk"), (False, True),
                                                                 PHASES)))
def test_pipo_may_load_the_next_block_while_this_one_computes(tier, kv, phase):
    graph = _graph("pipo", tier, kv, phase)
    blocks = SPEC.block_names()
    for block, following in zip(blocks, blocks[1:]):
        load_next = _load_name(graph, following)
        for compute in _compute_names(graph, block):
            assert not nx.has_path(graph, compute, load_next), (compute, load_next)


def test_pipo_moves_kv_beside_weights_and_the_next_mlp():
    graph = _graph("pipo", "host", True, "decode")
    for layer, micro in itertools.product(range(SPEC.n_layers), range(2)):
        (load_kv,) = [t.name for t in _tasks(graph, LoadKV) if (t.layer, t.micro) == (layer, micro)]
        (save_kv,) = [t.name for t in _tasks(graph, SaveKV) if (t.layer, t.micro) == (layer, micro)]
        pairs = [(load_kv, _load_name(graph, f"L{layer}.attn")),
                 (save_kv, _compute_names(graph, f"L{layer}.mlp")[micro])]
        for a, b in pairs:
            assert not nx.has_path(graph, a, b) and not nx.has_path(graph, b, a), (a, b)


def _steps(graph: nx.DiGraph) -> dict[str, int]:
    """Step of each task: how many Compute tasks precede it (a task of step s follows s)."""
    computes = {t.name for t in _tasks(graph, Compute)}
    return {n: len(nx.ancestors(graph, n) & computes) for n in graph}


def _barrier_violations(graph: nx.DiGraph) -> list[tuple[str, str]]:
    """Pairs (a, b) with a in an earlier step than b but not ordered before b."""
    step = _steps(graph)
    return [(a, b) for a in graph for b in graph
            if step[a] < step[b] and not nx.has_path(graph, a, b)]


@pytest.mark.parametrize("tier,kv,phase", list(itertools.product(PLACEMENTS, (False, True),
                                                                 PHASES)))
def test_flexgen_has_a_barrier_after_every_step(tier, kv, phase):
    graph = _graph("flexgen", tier, kv, phase)
    assert not _barrier_violations(graph)
    assert set(_steps(graph).values()) == set(range(len(_tasks(graph, Compute))))


def test_pipo_has_no_barrier():
    assert _barrier_violations(_graph("pipo", "host", True, "decode"))


def test_flexgen_overlaps_the_next_load_with_the_first_micro_batch_only():
    graph = _graph("flexgen", "host", True, "decode")
    blocks = SPEC.block_names()
    for block, following in zip(blocks, blocks[1:]):
        first, second = _compute_names(graph, block)
        load_next = _load_name(graph, following)
        assert not nx.has_path(graph, first, load_next)
        assert nx.has_path(graph, load_next, second)


@pytest.mark.parametrize("schedule,tier,kv,phase", CASES)
def test_weights_load_once_per_step_for_every_micro_batch(schedule, tier, kv, phase):
    graph = _graph(schedule, tier, kv, phase)
    loads = {t.block: t for t in _tasks(graph, LoadWeight)}
    assert len(loads) == len(_tasks(graph, LoadWeight))  # once per block
    streamed = [] if tier == RESIDENT else SPEC.block_names()
    assert sorted(loads) == sorted(streamed)
    for load in loads.values():
        assert load.lane == (DISK if tier == "disk" else LOAD_WEIGHT)
        computes = [t for t in _tasks(graph, Compute) if t.block == load.block]
        assert sorted(t.micro for t in computes) == [0, 1]
        for compute in computes:
            assert compute.slot == load.slot and graph.has_edge(load.name, compute.name)
            assert ("w", load.slot, load.block) in graph.nodes[compute.name]["reads"]
    if tier == RESIDENT:
        assert all(t.slot is None for t in _tasks(graph, Compute))


@pytest.mark.parametrize("schedule,tier,kv,phase", CASES)
def test_kv_moves_once_per_layer_and_micro_batch(schedule, tier, kv, phase):
    graph = _graph(schedule, tier, kv, phase)
    pairs = sorted(itertools.product(range(SPEC.n_layers), range(2)))
    loaded = sorted((t.layer, t.micro) for t in _tasks(graph, LoadKV))
    saved = sorted((t.layer, t.micro) for t in _tasks(graph, SaveKV))
    assert loaded == (pairs if kv and phase == "decode" else [])
    assert saved == (pairs if kv else [])
