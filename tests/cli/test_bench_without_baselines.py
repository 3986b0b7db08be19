"""``pipo bench`` right after ``scripts/setup.sh``: the baselines' packages (the ``bench`` extra)
are missing. pipo's own rows still run; each missing baseline's row says how to install it, and
asking for nothing but missing baselines is one error line."""

from __future__ import annotations

import json
import sys

import pytest

from pipo.cli import main

NOT_INSTALLED = "not installed: pip install -e .[bench]"
TINY = ["bench", "--device", "cpu", "--workload", "quick", "--shape", "tiny-opt",
        "--prompt-len", "8", "--gen-len", "2", "--batch", "2"]


@pytest.fixture
def no_hf(monkeypatch):
    """Make transformers and accelerate unimportable, as in a fresh setup.sh install."""
    for module in [m for m in sys.modules if m.split(".")[0] in ("transformers", "accelerate")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "accelerate", None)


def test_pipo_rows_run_and_the_baseline_row_says_how_to_install(no_hf, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(TINY + ["--schedules", "pipo", "--baselines", "transformers,accelerate",
                        "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"- transformers: {NOT_INSTALLED}" in printed
    assert f"- accelerate: {NOT_INSTALLED}" in printed
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["schedule"] == "pipo" and rows[0]["total_tok_s"] > 0
    assert [(r["system"], r["skipped"]) for r in rows[1:]] == [
        ("transformers", NOT_INSTALLED), ("accelerate", NOT_INSTALLED)]


def test_only_missing_baselines_is_one_error_line(no_hf, capsys):
    assert main(TINY + ["--schedules", "", "--baselines", "transformers"]) == 2
    err = capsys.readouterr().err
    assert err == f"pipo: error: nothing to run: transformers is {NOT_INSTALLED}\n"


@pytest.mark.slow
def test_the_default_cpu_bench_runs_pipo_alone(no_hf, capsys):
    assert main(["bench", "--device", "cpu", "--batch", "1", "--gen-len", "2",
                 "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "| batch | new tokens | pipo tok/s | transformers tok/s |" in table
    assert "| 1 | 2 |" in table and NOT_INSTALLED in table
