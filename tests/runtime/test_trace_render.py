"""Tracing (Chrome trace, busy fractions, timeline, summary) and rendering of step graphs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest

from graphs.golden.regen import golden_graph, traced_fake_run
from pipo.runtime import GraphBuilder, RunStats, Task, TaskRecord, graph_from_json
from pipo.runtime.graph import dumps_graph
from pipo.runtime.picture import (COL_PX, default_layers, graph_figure, parse_layers,
                                  unit_time_columns)
from pipo.runtime.render import LANE_COLORS, atomic_write, graph_png, render, to_dot
from pipo.runtime.trace import (chrome_trace, concat_runs, lane_busy_fraction, summary,
                                timeline_png, union_s, write_chrome_trace)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stats() -> RunStats:
    """A hand-made traced run: compute has overlapping records (as enqueue times on a GPU can)."""
    records = [TaskRecord("LoadWeight(L0.attn,0)", "load_weight", 0.0, 1.0),
               TaskRecord("Compute(L0.attn,0,0,-)", "compute", 1.0, 3.0),
               TaskRecord("Compute(L0.attn,1,0,-)", "compute", 2.0, 4.0),
               TaskRecord("Compute(L0.mlp,0,1,-)", "compute", 6.0, 7.0),
               TaskRecord("Checksum(L0.attn)", "verify", 1.0, 1.5)]
    return RunStats(wall_s=10.0, busy_s={"compute": 5.0, "load_weight": 1.0, "verify": 0.5},
                    records=records)


def test_busy_fraction_is_the_union_of_intervals_over_wall_time():
    stats = _stats()
    assert lane_busy_fraction(stats, "compute") == pytest.approx(0.4)  # [1,4] + [6,7]
    assert lane_busy_fraction(stats, "load_weight") == pytest.approx(0.1)
    assert lane_busy_fraction(stats, "save_kv") == 0.0
    assert lane_busy_fraction(RunStats(), "compute") == 0.0
    assert union_s([(5, 6), (0, 2), (1, 1.5), (1.5, 3)]) == pytest.approx(4.0)


def test_untraced_stats_are_refused_with_a_hint():
    with pytest.raises(ValueError, match=r"Runtime\(trace=True\)"):
        lane_busy_fraction(RunStats(wall_s=1.0, busy_s={"compute": 0.5}), "compute")


def test_chrome_trace_has_one_named_track_per_lane():
    stats = _stats()
    doc = json.loads(json.dumps(chrome_trace(stats)))
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert list(names.values()) == ["compute", "load_weight", "verify"]  # built-in lanes first
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(stats.records)
    first = next(e for e in spans if e["name"] == "Compute(L0.attn,1,0,-)")
    assert names[first["tid"]] == "compute" and first["cat"] == "Compute"
    assert (first["ts"], first["dur"]) == pytest.approx((2e6, 2e6))  # microseconds


def test_write_chrome_trace_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "step.trace.json"
    path.write_text("old")
    assert write_chrome_trace(_stats(), path) == path
    assert json.loads(path.read_text()) == json.loads(json.dumps(chrome_trace(_stats())))
    assert [p.name for p in tmp_path.iterdir()] == ["step.trace.json"]  # no temp file left


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(path, 123)
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_concat_runs_lays_steps_end_to_end():
    both = concat_runs([_stats(), _stats()])
    assert both.wall_s == 20.0 and len(both.records) == 10
    assert both.records[5].start_s == 10.0 and both.busy_s["compute"] == 10.0
    assert lane_busy_fraction(both, "compute") == pytest.approx(0.4)


def test_summary_lists_lanes_with_tasks_and_busy_time():
    table = summary(_stats()).splitlines()
    assert table[0].split() == ["lane", "tasks", "busy", "s", "busy", "%"]
    assert table[1].split() == ["compute", "3", "4.0000", "40.0%"]
    assert table[-1].split() == ["wall", "10.0000"]
    untraced = summary(RunStats(wall_s=2.0, busy_s={"compute": 1.0}))
    assert untraced.splitlines()[1].split() == ["compute", "?", "1.0000", "50.0%"]


def test_a_real_traced_run_gives_a_timeline_and_overlap(tmp_path):
    stats = traced_fake_run("pipo", task_s=0.002)
    assert len(stats.records) == len(golden_graph("pipo", "decode"))
    assert 0 < lane_busy_fraction(stats, "compute") <= 1
    path = timeline_png(stats, tmp_path / "timeline.png", title="pipo")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_dot_has_every_task_and_edge_coloured_by_lane():
    graph = golden_graph("pipo", "decode")
    dot = to_dot(graph)
    assert dot.startswith('digraph "step" {') and dot.rstrip().endswith("}")
    assert ('"LoadWeight(L0.attn,1)" [label="load L0.attn → slot 1", '
            f'fillcolor="{LANE_COLORS["load_weight"]}", tooltip="lane load_weight"];') in dot
    nodes = re.findall(r'^  "([^"]+)" \[label=', dot, flags=re.M)
    edges = re.findall(r'^  "([^"]+)" -> "([^"]+)";$', dot, flags=re.M)
    assert sorted(nodes) == sorted(graph) and sorted(edges) == sorted(graph.edges)
    assert '"legend:save_kv"' in dot


@dataclass(frozen=True, slots=True)
class Quoted(Task):
    """A task whose key needs escaping in DOT."""

    text: str


def test_dot_escapes_quotes_and_backslashes():
    b = GraphBuilder()
    b.add(Quoted('say "hi" \\ bye', lane="odd lane"))
    dot = to_dot(b.graph)
    assert r'"Quoted(say \"hi\" \\ bye)"' in dot and '"legend:odd lane"' in dot


def test_render_picks_the_format_from_the_suffix(tmp_path):
    graph = golden_graph("sequential", "prefill")
    for suffix in (".dot", ".json", ".png", ".svg"):
        assert render(graph, tmp_path / f"g{suffix}") == tmp_path / f"g{suffix}"
    assert (tmp_path / "g.dot").read_text() == to_dot(graph) == render(graph, "dot")
    assert (tmp_path / "g.json").read_text() == dumps_graph(graph) == render(graph, "json")
    assert graph_from_json(json.loads((tmp_path / "g.json").read_text())).edges == graph.edges
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC
    assert b"<svg" in (tmp_path / "g.svg").read_bytes()[:500]
    with pytest.raises(ValueError, match=r"\.dot, \.json, \.png, \.svg"):
        render(graph, tmp_path / "g.gif")


def test_pictures_are_reproducible(tmp_path):
    graph = golden_graph("pipo", "prefill")
    first = graph_png(graph, tmp_path / "a.png").read_bytes()
    assert first[:8] == PNG_MAGIC and render(graph, "png") == first
    assert render(graph, "svg") == render(graph, "svg")
    with pytest.raises(ValueError):  # a Path is always a file name, never a format name
        render(graph, tmp_path / "dot")


# --- the picture: one row per lane, time left to right, readable labels, elided middle layers ---

def _deep_graph(n_layers: int = 8, **plan):
    """A decode step of the golden model made ``n_layers`` deep."""
    from dataclasses import replace

    from graphs import build_step
    from graphs.golden.regen import golden_spec
    from pipo.plan import HOST, estimate_block_nbytes, fixed_plan

    spec = replace(golden_spec(), n_layers=n_layers)
    args = dict(batch=2, micro_batch=1, max_len=64, kv_offload=True) | plan
    return build_step(spec, fixed_plan(spec, estimate_block_nbytes(spec, 4), HOST, **args),
                      "decode")


def _drawn(graph, **kwargs):
    """The figure drawn by the Agg renderer, its tasks' boxes and label texts, by label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = graph_figure(graph, **kwargs)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    ax = fig.axes[0]
    boxes = [p for p in ax.patches if (p.get_gid() or "").startswith("box:")]
    labels = [t for t in ax.texts if (t.get_gid() or "").startswith("label:")]
    assert [b.get_gid()[4:] for b in boxes] == [t.get_gid()[6:] for t in labels]
    return fig, renderer, boxes, labels


def test_labels_are_at_least_11_px_and_fit_inside_their_boxes():
    for graph in (golden_graph("pipo", "decode"), golden_graph("flexgen", "prefill"),
                  _deep_graph(30)):
        fig, renderer, boxes, labels = _drawn(graph)
        texts = fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
        assert min(t.get_fontsize() * fig.dpi / 72 for t in texts if t.get_text()) >= 11
        assert len(boxes) == len(labels) > 0
        for box, label in zip(boxes, labels):
            inside = box.get_window_extent(renderer).padded(1)
            extent = label.get_window_extent(renderer)
            assert inside.x0 <= extent.x0 and extent.x1 <= inside.x1, label.get_text()
            assert inside.y0 <= extent.y0 and extent.y1 <= inside.y1, label.get_text()


def test_one_row_per_lane_and_every_arrow_points_forward_in_time():
    graph = golden_graph("pipo", "decode")
    columns = unit_time_columns(graph)
    lanes = {}
    for node, column in columns.items():
        lanes.setdefault((graph.nodes[node]["task"].lane, column), []).append(node)
    assert all(len(nodes) == 1 for nodes in lanes.values())  # a lane runs one task at a time
    assert all(columns[a] < columns[b] for a, b in graph.edges)
    _, _, boxes, labels = _drawn(graph)
    rows = {round(b.get_y()) for b in boxes}
    assert len(rows) == len({graph.nodes[n]["task"].lane for n in graph}) == 4
    assert {t.get_text().replace("\n", " ") for t in labels} >= {
        "load L0.attn → slot 1", "attn L0 · m1", "save KV L1 m0 from slot 0"}


def test_the_legend_explains_every_kind_drawn():
    fig, *_ = _drawn(golden_graph("pipo", "decode"), title="pipo")
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    for kind in ("Compute", "LoadWeight", "LoadKV", "SaveKV", "arrows"):
        assert kind in legend


def test_deep_models_draw_the_first_layers_and_the_last_with_the_middle_elided():
    graph = _deep_graph(30)
    assert default_layers(30) == [0, 1, 29] and default_layers(3) == [0, 1, 2]
    fig, _, _, labels = _drawn(graph)
    texts = {t.get_text().replace("\n", " ") for t in labels}
    assert {"embed · m0", "attn L1 · m1", "attn L29 · m0", "head · m1"} <= texts
    assert not any(re.search(r"\bL(2|28)\b", t) for t in texts)
    assert "… 27 layers …" in {t.get_text() for t in fig.axes[0].texts}
    three_layers = graph_figure(_deep_graph(3)).bbox.width
    assert fig.bbox.width == graph_figure(_deep_graph(100)).bbox.width  # any depth: one size
    assert fig.bbox.width <= three_layers + 3 * COL_PX  # an elision column and a few more
    fig, _, _, labels = _drawn(graph, layers=parse_layers("0-2,29"))
    assert "… 26 layers …" in {t.get_text() for t in fig.axes[0].texts}
    fig, _, _, labels = _drawn(graph, layers=[5])  # embed and head stay, each beside a gap
    gaps = sorted(t.get_text() for t in fig.axes[0].texts if t.get_text().startswith("…"))
    assert gaps == ["… 24 layers …", "… 5 layers …"]
    assert {"embed · m0", "attn L5 · m0", "head · m0"} <= {
        t.get_text().replace("\n", " ") for t in labels}


def test_a_graph_without_layers_is_drawn_whole():
    b = GraphBuilder()
    b.add(Quoted("one"), writes=[("x", 0, "a")])
    b.add(Quoted("two", lane="verify"), reads=[("x", 0, "a")])
    _, _, boxes, labels = _drawn(b.graph)
    assert [t.get_text() for t in labels] == ["Quoted(one)", "Quoted(two)"]


@pytest.mark.parametrize("text,layers", [("0-2,29", [0, 1, 2, 29]), ("3", [3]), ("1,1,0", [0, 1])])
def test_layer_lists(text, layers):
    assert parse_layers(text) == layers


@pytest.mark.parametrize("text", ["", "a", "2-", "-1", "3-1"])
def test_bad_layer_lists(text):
    with pytest.raises(ValueError, match="layer list"):
        parse_layers(text)
