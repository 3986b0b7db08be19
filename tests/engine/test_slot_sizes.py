"""Weight slots sized by the blocks they hold (:meth:`pipo.plan.Plan.slot_sizes`): the same round
robin in every schedule's graphs, the engine's slot buffers and the planner's memory count."""

from __future__ import annotations

import pytest
import torch

import pipo
from graphs import build_step
from pipo.engine.weights import PlacedWeights
from pipo.plan import DISK, HOST, RESIDENT, SCHEDULE_NAMES, Plan, fixed_plan
from pipo.planner.search import Request, memory_per_tier
from pipo.runtime.graph import tasks_in_order
from pipo.runtime.tasks import LoadWeight
from tests.e2e.conftest import build_model, hf_greedy

BLOCKS = ["embed", "L0.attn", "L0.mlp", "L1.attn", "L1.mlp", "head"]
SIZES = {"embed": 100, "L0.attn": 10, "L0.mlp": 30, "L1.attn": 11, "L1.mlp": 31, "head": 120}


def _plan(tiers: dict[str, str], n_slots: int) -> Plan:
    return Plan(tuple((b, tiers.get(b, HOST)) for b in BLOCKS), 1, 1, 8, n_weight_slots=n_slots)


def test_a_slot_is_as_large_as_its_largest_block():
    # 4 slots, round robin over the 6 streamed blocks: embed+L1.mlp, L0.attn+head, L0.mlp, L1.attn
    assert _plan({}, 4).slot_sizes(SIZES) == [100, 120, 30, 11]
    # an embedding read by rows takes no slot bytes: its slot is sized by L1.mlp
    assert _plan({}, 4).slot_sizes({**SIZES, "embed": 0}) == [31, 120, 30, 11]


def test_resident_blocks_take_no_slot_and_spare_slots_are_empty():
    plan = _plan({"embed": RESIDENT, "head": RESIDENT}, 3)   # streamed: the 4 layer blocks
    assert plan.weight_slots() == {"L0.attn": 0, "L0.mlp": 1, "L1.attn": 2, "L1.mlp": 0}
    assert plan.slot_sizes(SIZES) == [31, 30, 11]
    assert _plan({}, 8).slot_sizes(SIZES) == [100, 10, 30, 11, 31, 120, 0, 0]
    assert _plan({b: RESIDENT for b in BLOCKS}, 2).slot_sizes(SIZES) == []


@pytest.mark.parametrize("schedule", SCHEDULE_NAMES)
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_every_schedule_loads_each_block_into_the_plans_slot(schedule, phase):
    from pipo.bench.workloads import SHAPES

    spec = SHAPES["tiny-llama"]
    sizes = {b: 1 for b in spec.block_names()}
    plan = fixed_plan(spec, sizes, DISK, batch=2, max_len=8, micro_batch=1, n_weight_slots=3,
                      schedule=schedule)
    loads = {t.block: t.slot for t in tasks_in_order(build_step(spec, plan, phase))
             if isinstance(t, LoadWeight)}
    assert loads == plan.weight_slots()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An fp32 offload store of a tiny random llama (2 layers), and that model in transformers."""
    from pipo.io.source import open_model
    from pipo.io.store import convert

    path = tmp_path_factory.mktemp("slots-llama")
    model = build_model("llama", path)
    return convert(open_model(path), tmp_path_factory.mktemp("slots-store") / "s",
                   weights="fp32"), model


@pytest.mark.parametrize("placement", [HOST, DISK])
def test_the_engines_slots_follow_the_plan(store, placement):
    from pipo.io.source import open_model

    source = open_model(store[0])
    plan = fixed_plan(source.spec, {b: 1 for b in source.spec.block_names()}, placement,
                      batch=1, max_len=8, n_weight_slots=4)
    weights = PlacedWeights(source, plan, device=torch.device("cpu"), dtype=torch.float32)
    try:
        got = [s.numel() for s in weights.slots]
        blob = {b: source.block_nbytes(b) for b in source.spec.block_names()}
        if placement == DISK:  # read straight into the slots: at least one 4 KiB page each
            assert got == [max(n, 4096) for n in plan.slot_sizes({**blob, "embed": 0})]
        else:
            assert got == plan.slot_sizes({b: v.nbytes for b, v in weights.layouts.items()})
        assert sum(got) < 4 * max(blob.values())
    finally:
        weights.close()


def test_the_planner_counts_the_slots_the_engine_allocates(store):
    from pipo.io.source import open_model

    source = open_model(store[0])
    blob = {b: source.block_nbytes(b) for b in source.spec.block_names()}
    plan = fixed_plan(source.spec, blob, DISK, batch=1, max_len=8, n_weight_slots=4)
    request = Request(source.spec, batch=1, max_len=8, prompt_len=4, new_tokens=4,
                      embed_rows=True)
    weights = PlacedWeights(source, plan, device=torch.device("cpu"), dtype=torch.float32)
    try:
        allocated = sum(s.numel() for s in weights.slots)
    finally:
        weights.close()
    kv = plan.kv_nbytes
    assert memory_per_tier(plan, blob, request)[RESIDENT] - kv == pytest.approx(allocated, abs=4 * 4096)


@pytest.mark.parametrize("n_slots", [1, 3, 9])  # 9: more slots than the 6 streamed blocks
def test_any_slot_count_decodes_transformers_greedy_tokens(store, n_slots):
    path, model = store
    prompt = [3, 17, 42, 8]
    engine = pipo.load(path, placement="disk", n_weight_slots=n_slots)
    assert engine.generate_ids([prompt], 12).tokens == [hf_greedy(model, [prompt], 12)[0][0]]
