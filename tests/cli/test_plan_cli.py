"""``pipo probe`` and ``pipo plan`` on a tiny model, with a nominal profile (no measuring)."""

from __future__ import annotations

import pytest

from pipo.cli import main
from tests.e2e.conftest import build_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan-cli")
    build_model("llama", path)
    return path


@pytest.fixture(autouse=True)
def nominal(monkeypatch):
    from pipo.planner import profile

    monkeypatch.setattr(profile, "load_profile",
                        lambda device, dtype: profile.nominal_profile(device, dtype))


def test_plan_explains_the_choice_and_the_alternatives(tiny_llama, tmp_path, capsys):
    png = tmp_path / "step.png"
    argv = ["plan", str(tiny_llama), "--device-memory", "300KB", "--batch", "4",
            "--prompt-len", "8", "--new-tokens", "4", "--timeline", str(png), "--measure"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for word in ("chosen", "predicted", "bottleneck", "memory", "speculation", "next best",
                 "measured"):
        assert word in out, out
    assert png.stat().st_size > 0 and (tmp_path / "step-measured.png").stat().st_size > 0
    assert main(argv[:-3]) == 0  # same inputs, same plan
    assert _line(capsys.readouterr().out, "chosen") == _line(out, "chosen")


def _line(text: str, head: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(head))


def test_plan_refuses_an_impossible_cap_in_one_line(tiny_llama, capsys):
    assert main(["plan", str(tiny_llama), "--device-memory", "1KiB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipo: error: --device-memory") and err.count("\n") == 1


def test_probe_shows_a_cached_profile(tmp_path, monkeypatch, capsys):
    from pipo.planner import profile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(profile, "load_profile",
                        lambda device, dtype: profile.nominal_profile(device, dtype))
    assert main(["probe"]) == 0
    out = capsys.readouterr().out
    assert "cached profile" in out and "GB/s" in out and "per task" in out
