"""``--speculate auto`` (the default): with a small --device-memory on a link-bound machine a single
prompt runs through the int4 Speculator and prints plain greedy's text; with no cap, or a batch,
it stays plain; ``pipo plan`` shows the decision and why."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipo.cli import main

CAP = "300KB"  # the tiny model's blocks stream, and the int4 draft fits beside a re-planned target


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from tests.cli.tiny_text_model import build_text_model

    return build_text_model(tmp_path_factory.mktemp("spec-auto") / "model")


@pytest.fixture(autouse=True)
def slow_link(monkeypatch):
    """A profile whose link is far slower than its compute: a streamed decode step is link-bound."""
    from pipo.planner import profile

    monkeypatch.setattr(profile, "load_profile", lambda device, dtype: replace(
        profile.nominal_profile(device, dtype), h2d_pinned_bps=5e7, h2d_pageable_bps=5e7))


@pytest.fixture
def speculators(monkeypatch):
    """The drafts each Speculator built during the test was given."""
    from pipo.engine import speculate

    built, real = [], speculate.Speculator

    def spy(engine, draft, **kwargs):
        built.append(draft.name)
        return real(engine, draft, **kwargs)

    monkeypatch.setattr(speculate, "Speculator", spy)
    return built


def _generate(model, *extra, capsys) -> str:
    assert main(["generate", "--model", str(model), "abcabcabc", "-n", "12", *extra]) == 0
    return capsys.readouterr().out


def test_a_link_bound_single_prompt_speculates_and_prints_the_plain_text(text_model, capsys,
                                                                          speculators):
    plain = _generate(text_model, "--device-memory", CAP, "--speculate", "off", capsys=capsys)
    assert speculators == []
    assert _generate(text_model, "--device-memory", CAP, capsys=capsys) == plain
    assert speculators == ["int4-g128"]


def test_everything_resident_stays_plain(text_model, capsys, speculators):
    _generate(text_model, capsys=capsys)
    assert speculators == []


def test_an_explicit_choice_wins(text_model, capsys, speculators):
    _generate(text_model, "--speculate", "ngram", capsys=capsys)
    assert speculators == ["ngram"]


def test_a_batch_stays_plain(text_model, tmp_path, capsys, speculators):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p}) for p in ("abab", "hello hello")) + "\n")
    assert main(["generate", "--model", str(text_model), "--input", str(src), "-n", "4",
                 "--output", str(out), "--device-memory", CAP]) == 0
    assert speculators == []


def test_plan_shows_the_decision_and_its_reason(text_model, capsys):
    common = ["plan", str(text_model), "--device-memory", CAP, "--prompt-len", "9",
              "--new-tokens", "12"]
    assert main([*common, "--goal", "latency"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("speculation"))
    assert line.startswith("speculation int4: decode is link-bound (load_weight lane")
    assert "draft fits" in line and "target within" in out
    assert main(common) == 0  # the throughput goal's default batch of 8
    assert "speculation off: batch 8" in capsys.readouterr().out
