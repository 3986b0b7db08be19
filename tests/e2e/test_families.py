"""End to end: pipo's greedy tokens and logits equal transformers' on tiny models of each family,
for every schedule and placement (resident, streamed from host, streamed from disk, KV offloaded)."""

from __future__ import annotations

import pytest
import torch

import pipo
from tests.e2e.conftest import FAMILY_CONFIGS, NEW_TOKENS, PROMPTS

LOGIT_TOL = 1e-4


def run_pipo(path, **options):
    with pipo.load(path, **options) as engine:
        return engine.generate_ids(PROMPTS, NEW_TOKENS, keep_logits=True)


def assert_matches(result, reference):
    for row, (tokens, logits) in enumerate(reference):
        assert result.tokens[row] == tokens, f"row {row} tokens differ"
        ours = torch.stack([step[row] for step in result.logits])
        assert (ours - logits).abs().max().item() <= LOGIT_TOL


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_family_matches_transformers(tiny_models, family):
    path, reference = tiny_models[family]
    assert_matches(run_pipo(path), reference)


@pytest.mark.parametrize("schedule", ["sequential", "flexgen", "pipo"])
@pytest.mark.parametrize("placement,kv_offload", [
    ("resident", False), ("host", False), ("resident", True), ("host", True)])
def test_every_schedule_and_placement(tiny_models, schedule, placement, kv_offload):
    path, reference = tiny_models["llama"]
    result = run_pipo(path, schedule=schedule, placement=placement, kv_offload=kv_offload,
                      micro_batch=1, n_weight_slots=2)
    assert_matches(result, reference)


def test_budget_plan_streams_some_blocks(tiny_models):
    path, reference = tiny_models["qwen2"]
    result = run_pipo(path, device_memory=300_000)
    tiers = {tier for _, tier in result.plan.placement}
    assert tiers == {"resident", "host"}
    assert_matches(result, reference)


@pytest.mark.parametrize("schedule,staged", [("sequential", False), ("pipo", False),
                                             ("pipo", True), ("flexgen", True)])
def test_weights_streamed_from_disk_store(tiny_models, tmp_path, schedule, staged):
    from pipo.io.source import open_model
    from pipo.io.store import convert

    path, reference = tiny_models["opt"]
    store = convert(open_model(path), tmp_path / "store", weights="fp32")
    result = run_pipo(store, placement="disk", schedule=schedule, kv_offload=True,
                      staged_disk=staged)
    assert {tier for _, tier in result.plan.placement} == {"disk"}
    assert_matches(result, reference)


def test_disk_placement_needs_a_store(tiny_models):
    from pipo.errors import PlanError

    path, _ = tiny_models["llama"]
    with pytest.raises(PlanError, match="pipo convert"):
        run_pipo(path, placement="disk")


def test_tied_embedding_is_kept_once(tiny_models, tmp_path):
    from tests.e2e.conftest import make_config

    from transformers import AutoModelForCausalLM

    config = make_config("llama")
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pipo.load(tmp_path) as engine:
        engine.generate_ids([[1, 2, 3]], 2)
        resident = engine._weights.resident
    assert resident["head"]["w_out"] is resident["embed"]["tok"]


def test_sliding_window_limit_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    from pipo.errors import GenerationError
    from tests.e2e.conftest import make_config

    config = make_config("mistral")
    config.sliding_window = 16
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pipo.load(tmp_path) as engine:
        with pytest.raises(GenerationError, match="sliding attention window of 16"):
            engine.generate_ids([[1, 2, 3]], 20)


def test_kv_cache_in_a_scratch_file(tiny_models, tmp_path):
    path, reference = tiny_models["llama"]
    result = run_pipo(path, kv_disk_dir=str(tmp_path), micro_batch=1)
    assert result.plan.kv_offloaded and result.plan.kv_disk
    assert_matches(result, reference)
    assert list(tmp_path.iterdir()) == []  # the scratch file is unlinked once mapped


def test_micro_batch_larger_than_a_short_batch(tiny_models):
    path, reference = tiny_models["llama"]
    with pipo.load(path, micro_batch=4, placement="host", kv_offload=True) as engine:
        result = engine.generate_ids(PROMPTS[:1], NEW_TOKENS)
    assert result.tokens[0] == reference[0][0]
