"""The planner: never a plan over its caps (random specs and caps), pins respected, deterministic."""

from __future__ import annotations

import random

import pytest

from pipo.errors import PlanError
from pipo.io.spec import ModelSpec
from pipo.plan import DISK, HOST, RESIDENT, estimate_block_nbytes, kv_cache_nbytes
from pipo.planner.profile import nominal_profile
from pipo.planner.search import Caps, Pins, Request, plan_run

PROFILE = nominal_profile()


def _random_case(rng: random.Random):
    heads = rng.choice([2, 4, 8])
    spec = ModelSpec(rng.choice(["llama", "opt"]), vocab_size=rng.choice([500, 4000, 20000]),
                     hidden=heads * 16, n_layers=rng.randint(1, 6), n_heads=heads,
                     n_kv_heads=heads if rng.random() < 0.5 else heads // 2, head_dim=16,
                     ffn=rng.choice([64, 256, 1024]), max_positions=1024)
    batch = rng.choice([1, 2, 3, 8, 13])
    prompt = rng.randint(1, 64)
    request = Request(spec, batch, prompt + 16, prompt, 16, dtype_nbytes=rng.choice([2, 4]),
                      has_store=rng.random() < 0.5, kv_disk_ok=rng.random() < 0.5,
                      device_is_host=rng.random() < 0.5, staged_disk=rng.random() < 0.5)
    total = sum(estimate_block_nbytes(spec, request.dtype_nbytes).values())
    caps = Caps(device_memory=int(total * rng.uniform(0.05, 1.5)) if rng.random() < 0.9 else None,
                host_memory=int(total * rng.uniform(0.1, 4)) if rng.random() < 0.7 else None,
                allow_int4=rng.random() < 0.5)
    return request, caps


def _independent_usage(plan, request, int4):
    """Bytes per tier recomputed from the plan alone (not through the planner's own helper)."""
    spec, nb = request.spec, request.dtype_nbytes
    sizes = estimate_block_nbytes(spec, nb, request.group_size if int4 else None)
    tiers = dict(plan.placement)
    streamed = [sizes[b] for b, t in tiers.items() if t != RESIDENT]
    kv = kv_cache_nbytes(spec, plan.batch, plan.max_len, nb)
    device = sum(sizes[b] for b, t in tiers.items() if t == RESIDENT)
    device += plan.n_weight_slots * max(streamed, default=0)
    device += plan.n_kv_slots * (kv // spec.n_layers // plan.n_micro) if plan.kv_offloaded else kv
    host = sum(sizes[b] for b, t in tiers.items() if t == HOST)
    host += kv if plan.kv_offloaded and not plan.kv_disk else 0
    if plan.staged_disk:
        host += plan.n_weight_slots * max(sizes[b] for b, t in tiers.items() if t == DISK)
    return device, host + (device if request.device_is_host else 0)


def test_no_plan_exceeds_its_caps():
    rng = random.Random(11)
    planned = 0
    for _ in range(120):
        request, caps = _random_case(rng)
        try:
            result = plan_run(request, caps, PROFILE)
        except PlanError:
            continue
        planned += 1
        for choice in (result.best, *result.alternatives):
            plan = choice.plan
            device, host = _independent_usage(plan, request, choice.int4)
            if caps.device_memory is not None:
                assert device <= caps.device_memory * 0.9, (request, caps, plan)
            if caps.host_memory is not None:
                assert host <= caps.host_memory, (request, caps, plan)
            assert choice.int4 is False or caps.allow_int4
            assert not plan.kv_disk or request.kv_disk_ok
            assert DISK not in dict(plan.placement).values() or request.has_store
            assert 1 <= plan.micro_batch <= plan.batch
    assert planned > 40  # most random cases are plannable: the test checks real plans


def test_same_inputs_same_plan():
    rng = random.Random(5)
    for _ in range(10):
        request, caps = _random_case(rng)
        try:
            first = plan_run(request, caps, PROFILE)
        except PlanError:
            continue
        again = plan_run(request, caps, PROFILE)
        assert first == again


def test_pins_are_kept_and_the_rest_is_chosen():
    spec = ModelSpec("llama", vocab_size=4000, hidden=128, n_layers=4, n_heads=4, n_kv_heads=2,
                     head_dim=32, ffn=512, max_positions=1024)
    request = Request(spec, 8, 96, 64, 32)
    cap = sum(estimate_block_nbytes(spec, 4).values()) * 7 // 10
    pins = Pins(kv="host", micro_batch=4, schedule="flexgen")
    plan = plan_run(request, Caps(device_memory=cap), PROFILE, pins).best.plan
    assert (plan.kv_offloaded, plan.micro_batch, plan.schedule) == (True, 4, "flexgen")
    assert not plan.kv_disk


def test_a_cap_below_every_candidate_is_refused():
    spec = ModelSpec("llama", vocab_size=4000, hidden=128, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=32, ffn=512, max_positions=1024)
    with pytest.raises(PlanError):
        plan_run(Request(spec, 1, 32, 16, 16), Caps(device_memory=1000), PROFILE)


def test_a_slower_link_never_predicts_more_tokens_per_second():
    spec = ModelSpec("llama", vocab_size=4000, hidden=256, n_layers=4, n_heads=4, n_kv_heads=2,
                     head_dim=64, ffn=1024, max_positions=1024)
    request = Request(spec, 4, 96, 64, 32)
    cap = sum(estimate_block_nbytes(spec, 4).values()) // 4
    speeds = [plan_run(request, Caps(device_memory=cap, link_bps=gbps * 1e9), PROFILE)
              .best.estimate.tok_s for gbps in (0.5, 2, 8)]
    assert speeds == sorted(speeds)
    assert speeds[0] < speeds[-1]


def test_a_link_cap_keeps_tokens_and_streams_at_most_the_cap(tmp_path):
    """Generation with --link-gbps gives the same tokens; its copy tasks are never faster than
    bytes / cap."""
    from pipo import load
    from pipo.runtime.tasks import LOAD_WEIGHT
    from tests.e2e.conftest import build_model

    build_model("llama", tmp_path)
    prompts = [[1, 5, 9, 3]]
    with load(tmp_path, placement="host") as engine:
        free = engine.generate_ids(prompts, 4).tokens
    with load(tmp_path, placement="host", link_gbps=0.05, trace=True) as engine:
        capped = engine.generate_ids(prompts, 4)
        sizes = {b: engine._weights.host[b][0].nbytes for b in engine._weights.host}
    assert capped.tokens == free
    loads = [r for s in capped.step_stats for r in s.records if r.lane == LOAD_WEIGHT]
    assert loads
    for r in loads:
        block = r.name.removeprefix("LoadWeight(").rsplit(",", 1)[0]
        assert r.end_s - r.start_s >= sizes[block] / 0.05e9


def test_allow_int4_lets_the_engine_switch_to_int4_weights(tmp_path, monkeypatch):
    """With --allow-int4 and a link-bound budget the planner picks int4 (4x fewer bytes streamed);
    the engine then places int4 weights and generates."""
    from pipo import load
    from pipo.planner import engine_plan
    from tests.e2e.conftest import build_model

    monkeypatch.setattr(engine_plan, "profile_for", lambda device, dtype: PROFILE)
    build_model("llama", tmp_path)
    with load(tmp_path, device_memory=150_000, allow_int4=True, link_gbps=0.01) as engine:
        result = engine.generate_ids([[1, 5, 9, 3]], 3)
        assert engine.options.weights == "int4"
        assert engine._weights.int4_group == engine.options.group_size
    assert len(result.tokens[0]) == 3


def test_the_cpu_4bit_path_plans_with_its_kept_q8_embedding_and_head():
    spec = ModelSpec("llama", vocab_size=20000, hidden=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=16, ffn=256, max_positions=1024)
    base = Request(spec, 1, 48, 32, 16, dtype_nbytes=2, group_size=32)
    packed = Request(spec, 1, 48, 32, 16, dtype_nbytes=2, group_size=32, int4_packed=True,
                     q8=frozenset({"tok", "w_out"}))
    pins, caps = Pins(int4=True, tier=RESIDENT), Caps(allow_int4=True)
    dense_ends, kept = (dict(plan_run(r, caps, PROFILE, pins).best.memory) for r in (base, packed))
    table = spec.vocab_size * spec.hidden  # the bf16 embedding and head, 2 bytes a value each
    saved = 2 * table * 2 - (table * 34 // 32 + table * 5 // 4)  # Q8_0 table; head as 2 int4 halves
    assert dense_ends["resident"] - kept["resident"] == pytest.approx(saved, rel=0.01)
