"""``--speculate auto``: the planner turns the int4 draft on at batch 1 when the decode step is
link-bound and the draft fits beside the plan, else off; an explicit choice wins."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipo.io.spec import ModelSpec
from pipo.plan import ACTIVATION_RESERVE_FRACTION, RESIDENT, estimate_block_nbytes, fixed_plan
from pipo.planner.estimate import Estimate
from pipo.planner.profile import nominal_profile
from pipo.planner.search import Caps, Choice, Pins, Request, plan_run
from pipo.planner.speculation import DRAFT_DTYPE_NBYTES, decide, draft_nbytes

SPEC = ModelSpec("llama", vocab_size=1024, hidden=128, n_layers=8, n_heads=4, n_kv_heads=2,
                 head_dim=32, ffn=512, max_positions=256)
MIB = 2**20


def _request(batch: int = 1) -> Request:
    return Request(SPEC, batch, 64, 32, 32, dtype_nbytes=4)


def _choice(bottleneck: str, busy: float, device_nbytes: int = 0, host_nbytes: int = 0,
            tier: str = "host") -> Choice:
    """A hand-made scored plan: every block in ``tier``, the bottleneck lane ``busy`` busy."""
    plan = fixed_plan(SPEC, estimate_block_nbytes(SPEC, 4), tier, batch=1, max_len=64)
    busy_lanes = {"compute": 0.3, bottleneck: busy}
    est = Estimate(0.1, 0.2, 10.0, bottleneck, tuple(sorted(busy_lanes.items())))
    return Choice(plan, False, est, (("resident", device_nbytes), ("host", host_nbytes),
                                     ("disk", 0)))


def _decide(choice, batch=1, caps=Caps(), pin="auto", profile=None):
    return decide(_request(batch), caps, profile or nominal_profile(), Pins(), choice, pin)


def test_link_bound_and_the_draft_fits_turns_int4_on():
    got = _decide(_choice("disk", 0.92))
    assert got.kind == "int4" and got.draft_nbytes == draft_nbytes(_request(), got.choice.plan)
    assert got.describe().startswith("speculation int4: decode is link-bound (disk lane 92 % busy)")
    assert "draft fits" in got.reason
    assert _decide(_choice("load_weight", 0.8)).kind == "int4"


def test_compute_bound_stays_off():
    got = _decide(_choice("compute", 0.9, tier="resident"))
    assert got.kind == "off" and "compute-bound (compute lane 90 % busy)" in got.reason


def test_a_draft_that_does_not_fit_the_host_stays_off():
    choice = _choice("load_weight", 0.9, host_nbytes=10 * MIB)
    need = draft_nbytes(_request(), choice.plan)
    assert _decide(choice, caps=Caps(host_memory=10 * MIB + need)).kind == "int4"
    got = _decide(choice, caps=Caps(host_memory=10 * MIB + need - 1))
    assert got.kind == "off" and "does not fit" in got.reason


def test_batches_above_one_stay_off():
    got = _decide(_choice("disk", 0.95), batch=4)
    assert got.kind == "off" and "batch 4" in got.reason


@pytest.mark.parametrize("pin", ["off", "int4", "ngram", "/models/draft"])
def test_an_explicit_choice_wins(pin):
    for choice in (_choice("disk", 0.95), _choice("compute", 0.9)):
        got = _decide(choice, pin=pin)
        assert got.kind == pin and "pinned" in got.reason


def test_the_draft_shares_the_targets_resident_embedding_and_head():
    resident = _choice("compute", 0.9, tier="resident").plan
    host = _choice("compute", 0.9).plan
    sizes = estimate_block_nbytes(SPEC, DRAFT_DTYPE_NBYTES, 128, cpu_packed=True)
    assert draft_nbytes(_request(), host) - draft_nbytes(_request(), resident) == (
        sizes["embed"] + sizes["head"])
    layers = sum(n for b, n in sizes.items() if b not in ("embed", "head"))
    kv = 2 * SPEC.n_layers * 64 * SPEC.n_kv_heads * SPEC.head_dim * DRAFT_DTYPE_NBYTES
    assert draft_nbytes(_request(), resident) == layers + kv


def _slow_link():
    """A profile whose link is 100x slower than its compute: streamed weights bound the step."""
    return replace(nominal_profile(), h2d_pinned_bps=5e7, h2d_pageable_bps=5e7)


def test_under_a_device_cap_the_target_is_replanned_to_leave_room_for_the_draft():
    request, profile = _request(), _slow_link()
    total = sum(estimate_block_nbytes(SPEC, 4).values())
    caps = Caps(device_memory=int(0.8 * total))
    best = plan_run(request, caps, profile).best
    assert best.estimate.bottleneck == "load_weight"
    got = decide(request, caps, profile, Pins(), best)
    assert got.kind == "int4" and got.device_memory < caps.device_memory
    usable = caps.device_memory * (1 - ACTIVATION_RESERVE_FRACTION)
    assert dict(got.choice.memory)[RESIDENT] + got.draft_nbytes <= usable
    assert dict(best.memory)[RESIDENT] + got.draft_nbytes > usable  # the first plan left no room


def test_no_plan_beside_the_draft_stays_off():
    request, profile = _request(), _slow_link()
    sizes = estimate_block_nbytes(SPEC, 4)
    floor = 2 * max(sizes.values()) + 64 * 2**10  # about the smallest cap that plans at all
    caps = Caps(device_memory=int(floor / (1 - ACTIVATION_RESERVE_FRACTION)))
    best = plan_run(request, caps, profile).best
    got = decide(request, caps, profile, Pins(), best)
    assert got.kind == "off" and "besides the int4 draft" in got.reason
