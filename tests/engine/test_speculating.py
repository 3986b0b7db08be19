"""``pipo.load(..., speculate=...)``: the Python side of ``--speculate``. Every kind decodes
transformers' greedy tokens; ``auto`` asks the planner per request; a model draft's KV grows to a
longer request; bad values are one clear error and leave nothing open."""

from __future__ import annotations

from dataclasses import replace

import pytest

import pipo
from pipo.engine import Engine
from pipo.engine.drafts import DraftError
from pipo.engine.speculate import Speculator
from pipo.engine.speculating import AutoSpeculator
from pipo.errors import ModelFormatError
from tests.e2e.conftest import build_model, hf_greedy

PROMPT = [3, 17, 42, 8, 99, 5, 61, 3, 17, 42]
NEW = 12


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(path, transformers model) of a tiny random llama."""
    path = tmp_path_factory.mktemp("speculating-llama")
    return path, build_model("llama", path)


@pytest.fixture
def slow_link(monkeypatch):
    """A profile whose link is far slower than its compute: a streamed decode is link-bound."""
    from pipo.planner import profile

    monkeypatch.setattr(profile, "load_profile", lambda device, dtype: replace(
        profile.nominal_profile(device, dtype), h2d_pinned_bps=5e7, h2d_pageable_bps=5e7))


def test_off_is_the_plain_engine(llama):
    with pipo.load(llama[0]) as engine:
        assert type(engine) is Engine


@pytest.mark.parametrize("budget", [None, 6], ids=["chain", "tree"])
@pytest.mark.parametrize("kind", ["int4", "ngram", "model"])
def test_each_kind_decodes_transformers_greedy_tokens(llama, kind, budget):
    path, model = llama
    speculate = str(path) if kind == "model" else kind  # the model as its own draft
    want = hf_greedy(model, [PROMPT], NEW)[0][0]
    with pipo.load(path, placement="host", speculate=speculate, draft_tokens=3,
                   draft_budget=budget) as spec:
        assert isinstance(spec, Speculator)
        assert spec.generate_ids([PROMPT], NEW).tokens == [want]
        assert spec.stats.passes < NEW or kind == "ngram"


def test_a_longer_request_grows_the_drafts_kv(llama, monkeypatch):
    from pipo.engine import speculating

    monkeypatch.setattr(speculating, "DRAFT_LEN", 8)  # shorter than any request below
    path, model = llama
    with pipo.load(path, speculate="int4") as spec:
        for prompt, new in (([5, 6], 3), (PROMPT * 4, 20)):
            assert spec.generate_ids([prompt], new).tokens == [hf_greedy(model, [prompt], new)[0][0]]
        assert spec.draft.batch.max_len >= 4 * len(PROMPT) + 20


def test_auto_speculates_a_link_bound_single_prompt_only(llama, slow_link):
    path, model = llama
    want = hf_greedy(model, [PROMPT, [7, 12, 88]], NEW)
    with pipo.load(path, device_memory=300_000, speculate="auto") as auto:
        assert isinstance(auto, AutoSpeculator)
        assert auto.generate_ids([PROMPT], NEW).tokens == [want[0][0]]
        assert auto.kind == "int4" and auto.stats.passes < NEW
        both = auto.generate_ids([PROMPT, [7, 12, 88]], NEW)
        assert auto.kind == "off" and both.tokens == [t for t, _ in want]


def test_auto_generates_the_plain_text(tmp_path, slow_link):
    from tests.cli.tiny_text_model import build_text_model

    model = build_text_model(tmp_path / "text")
    with pipo.load(model, device_memory=300_000) as plain:
        want = plain.generate("abcabcabc", 10)
    with pipo.load(model, device_memory=300_000, speculate="auto") as auto:
        assert auto.generate("abcabcabc", 10) == want
        assert auto.kind == "int4"


def test_auto_with_everything_resident_stays_plain(llama):
    path, model = llama
    with pipo.load(path, speculate="auto") as auto:
        assert auto.generate_ids([PROMPT], NEW).tokens == [hf_greedy(model, [PROMPT], NEW)[0][0]]
        assert auto.kind == "off" and auto.stats is None


@pytest.mark.parametrize("options, error, words", [
    ({"speculate": "int5"}, ModelFormatError, "neither a draft kind"),
    ({"speculate": "int4", "draft_tokens": 0}, DraftError, "at least 1"),
    ({"speculate": "ngram", "draft_budget": 0}, DraftError, "at least 1"),
    ({"speculate": "int4", "draft_group_size": 48}, DraftError, "group-size"),
])
def test_bad_values_are_one_clear_error(llama, options, error, words):
    with pytest.raises(error, match=words):
        pipo.load(llama[0], **options)
