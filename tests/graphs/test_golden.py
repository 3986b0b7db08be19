"""Golden graphs: the builders' output for the tiny golden plan must equal graphs/golden/*.json.

A failure means a schedule changed. If the change is intended, regenerate the files and review
the diff (a changed edge is a changed schedule):  python -m graphs.golden.regen
"""

from __future__ import annotations

import difflib
import json

import pytest

from graphs import SCHEDULES
from graphs.golden.regen import GOLDEN_DIR, PHASES, golden_graph, golden_path, regenerate
from pipo.runtime import check_graph, graph_from_json
from pipo.runtime.graph import dumps_graph

REGEN_HINT = ("if this change to the schedule is intended, run `python -m graphs.golden.regen` "
              "and review the diff of graphs/golden/*.json")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_builder_output_equals_the_golden_file(schedule, phase):
    path = golden_path(schedule, phase)
    assert path.exists(), f"{path} is missing: {REGEN_HINT}"
    want, got = path.read_text(), dumps_graph(golden_graph(schedule, phase))
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                            str(path), "built now", n=0))
        pytest.fail(f"{schedule} {phase} graph differs from {path.name}; {REGEN_HINT}\n"
                    f"{diff[:3000]}")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_golden_files_load_back_into_valid_graphs(schedule, phase):
    graph = graph_from_json(json.loads(golden_path(schedule, phase).read_text()))
    check_graph(graph)
    assert dumps_graph(graph) == golden_path(schedule, phase).read_text()


def test_every_schedule_has_a_golden_picture():
    for schedule in SCHEDULES:
        png = golden_path(schedule, "decode", ".png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png}: {REGEN_HINT}"
    assert sorted(p.name for p in GOLDEN_DIR.glob("*.json")) == sorted(
        f"{s}_{p}.json" for s in SCHEDULES for p in PHASES)


def test_regenerate_writes_what_the_test_compares(tmp_path):
    written = regenerate(tmp_path, pictures=False)
    assert sorted(p.name for p in written) == sorted(p.name for p in GOLDEN_DIR.glob("*.json"))
    for path in written:
        assert path.read_text() == (GOLDEN_DIR / path.name).read_text()
