"""A step graph as a picture: one row per lane, time left to right, a labelled box per task.

Layout. Each task sits in the column where it would start if every task took one time unit and
each lane ran its ready tasks one at a time in the scheduler's order (longest path to the end of
the graph first, then program order): the picture reads like an ideal timeline of the step, and a
column holds at most one task per lane. Arrows are the edges between lanes (a task waits for one on
another lane); an edge within a lane is implied by the row's order.

Deep models. Only some layers are drawn (:func:`default_layers`: the first two and the last), the
left-out middle shows as one column "… 27 layers …". Layers come from ``Task.model_layer``; a task
without one (embed, head) is drawn with the layers it follows in the graph. Columns are compacted
per drawn stretch of layers, so each stretch keeps its own timing.

Labels come from ``Task.label()`` (any kind can override it), colours from the task kind, and the
legend from each kind's docstring. Text is 9 pt at 100 dpi (12.5 px at 100 %).
"""

from __future__ import annotations

import heapq
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import networkx as nx

from pipo.runtime.program import longest_path_to_end
from pipo.runtime.render import KIND_COLORS, color_for, ordered_lanes

DPI = 100
COL_PX, ROW_PX = 150, 54  # one column / one lane row, in pixels
BOX_W, BOX_H = 0.9, 0.8  # a task's box, in columns / rows
FONT_PT = 9
LABEL_CHARS = 16  # a box holds two lines of this many characters at FONT_PT
CONNECTORS = ("→", "←", "·", "from", "to")
LEFT_PX, RIGHT_PX, BOTTOM_PX = 110, 16, 12
LEGEND_ROW_PX, TITLE_PX = 20, 30
EDGE_COLOR = "#707070"


@dataclass
class Stretch:
    """Tasks drawn side by side: a run of kept layers (with the layer-less tasks that follow
    them), ``elided_before`` left-out layers in front of it."""

    low: float
    high: float
    nodes: list[str] = field(default_factory=list)
    elided_before: int = 0


def unit_time_columns(graph: nx.DiGraph) -> dict[str, int]:
    """Start column of every task when each takes one unit and each lane runs one at a time,
    highest priority (longest path to the end, then program order) first."""
    order = tuple(nx.lexicographical_topological_sort(
        graph, key=lambda n: graph.nodes[n].get("order", 0)))
    depth = longest_path_to_end(graph, order)
    waiting = {n: graph.in_degree(n) for n in graph}
    ready: dict[str, list] = defaultdict(list)

    def push(node: str) -> None:
        key = (-depth[node], graph.nodes[node].get("order", 0), node)
        heapq.heappush(ready[graph.nodes[node]["task"].lane], key)

    for node in order:
        if not waiting[node]:
            push(node)
    columns: dict[str, int] = {}
    time = 0
    while len(columns) < len(graph):
        started = [heapq.heappop(heap)[2] for heap in ready.values() if heap]
        for node in started:
            columns[node] = time
        for node in started:
            for succ in graph.successors(node):
                waiting[succ] -= 1
                if not waiting[succ]:
                    push(succ)
        time += 1
    return columns


def default_layers(n_layers: int) -> list[int]:
    """The layers drawn unless asked otherwise: all of up to 4, else the first two and the last."""
    return list(range(n_layers)) if n_layers <= 4 else [0, 1, n_layers - 1]


def parse_layers(text: str) -> list[int]:
    """Layers from a list like ``0-2,29`` (sorted, without repeats); ``ValueError`` if malformed."""
    layers: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"invalid layer list {text!r}: use numbers and ranges, e.g. 0-2,29")
        layers.update(range(int(low), int(high if dash else low) + 1))
    if not layers:
        raise ValueError(f"invalid layer list {text!r}: the range is empty")
    return sorted(layers)


def layer_count(graph: nx.DiGraph) -> int:
    """Number of model layers the graph's tasks name (0 when none does)."""
    layers = [graph.nodes[n]["task"].model_layer for n in graph]
    return 1 + max((x for x in layers if x is not None), default=-1)


def stretches(graph: nx.DiGraph, layers: Iterable[int]) -> list[Stretch]:
    """The graph's drawn tasks, grouped into stretches in layer order, for the kept ``layers``.

    A task with a layer is drawn when its layer is kept. A task without one goes with the latest
    layer among its ancestors (none: before layer 0): into that layer's stretch, or the one that
    starts right after it, else into a stretch of its own.
    """
    kept = sorted(set(layers))
    runs: list[Stretch] = []
    for layer in kept:
        if runs and runs[-1].high == layer - 1:
            runs[-1].high = layer
        else:
            runs.append(Stretch(layer, layer))
    latest: dict[str, int] = {}
    for node in nx.topological_sort(graph):
        own = graph.nodes[node]["task"].model_layer
        inherited = max((latest[p] for p in graph.predecessors(node)), default=-1)
        latest[node] = inherited if own is None else max(own, inherited)
        if own is not None:
            home = next((r for r in runs if r.low <= own <= r.high), None)
        else:
            home = next((r for r in runs if r.low <= inherited + 1 and inherited <= r.high), None)
            if home is None:
                home = Stretch(inherited + 0.5, inherited + 0.5)
                runs.append(home)
                runs.sort(key=lambda r: r.low)
        if home is not None:
            home.nodes.append(node)
    return _count_elided([r for r in runs if r.nodes], layer_count(graph))


def _count_elided(runs: list[Stretch], n_layers: int) -> list[Stretch]:
    previous = -1.0
    for run in runs:
        run.elided_before = sum(1 for layer in range(n_layers) if previous < layer < run.low)
        previous = run.high
    return runs


def positions(groups: list[Stretch], columns: dict[str, int]
              ) -> tuple[dict[str, int], list[tuple[int, int]], int]:
    """Column of every drawn task, the elision columns as (column, layers left out), and the
    number of columns: each stretch's columns compacted, an elision column in front of it."""
    x: dict[str, int] = {}
    gaps: list[tuple[int, int]] = []
    offset = 0
    for group in groups:
        if group.elided_before:
            gaps.append((offset, group.elided_before))
            offset += 1
        rank = {c: i for i, c in enumerate(sorted({columns[n] for n in group.nodes}))}
        for node in group.nodes:
            x[node] = offset + rank[columns[node]]
        offset += len(rank)
    return x, gaps, offset


def wrapped_label(text: str) -> str:
    """A task label on at most two lines of up to :data:`LABEL_CHARS` characters: split at the
    space that balances the lines best, preferring to start the second line with a connector
    (``→ slot 1``, ``from slot 0``)."""
    if len(text) <= LABEL_CHARS:
        return text
    words = text.split(" ")
    splits = [(" ".join(words[:i]), " ".join(words[i:])) for i in range(1, len(words))]
    fitting = [s for s in splits if max(map(len, s)) <= LABEL_CHARS]
    if fitting:
        return "\n".join(min(fitting, key=lambda s: max(map(len, s)) - 4 * (
            s[1].split(" ")[0] in CONNECTORS)))
    lines = textwrap.wrap(text, LABEL_CHARS)
    return "\n".join([lines[0], textwrap.shorten(" ".join(lines[1:]), LABEL_CHARS,
                                                 placeholder="…")])


def graph_figure(graph: nx.DiGraph, title: str | None = None,
                 layers: Iterable[int] | None = None):
    """A matplotlib Figure of ``graph`` (see the module docstring); ``layers``: the layers to
    draw (default: :func:`default_layers`)."""
    from matplotlib.figure import Figure

    groups = stretches(graph, default_layers(layer_count(graph)) if layers is None else layers)
    x, gaps, n_cols = positions(groups, unit_time_columns(graph))
    tasks = {n: graph.nodes[n]["task"] for n in x}
    lanes = ordered_lanes({t.lane for t in tasks.values()})
    kinds = sorted({type(t) for t in tasks.values()}, key=_kind_rank)
    top_px = (TITLE_PX if title else 0) + (len(kinds) + 1) * LEGEND_ROW_PX + 8
    width_px = LEFT_PX + max(n_cols, 1) * COL_PX + RIGHT_PX
    height_px = top_px + len(lanes) * ROW_PX + BOTTOM_PX
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    ax = fig.add_axes((LEFT_PX / width_px, BOTTOM_PX / height_px,
                       max(n_cols, 1) * COL_PX / width_px, len(lanes) * ROW_PX / height_px))
    ax.set_xlim(0, max(n_cols, 1))
    ax.set_ylim(len(lanes), 0)
    ax.set_axis_off()
    row = {lane: i for i, lane in enumerate(lanes)}
    _draw_rows(ax, lanes, n_cols)
    _draw_gaps(ax, gaps, len(lanes))
    _draw_edges(ax, graph, groups, x, row)
    for node, task in tasks.items():
        _draw_task(ax, x[node], row[task.lane], task)
    _draw_legend(fig, kinds, title)
    return fig


def _draw_rows(ax, lanes: list[str], n_cols: int) -> None:
    for i, lane in enumerate(lanes):
        if i % 2 == 0:
            ax.axhspan(i, i + 1, color="#f3f3f3", zorder=0)
        ax.text(-0.06, i + 0.5, lane, ha="right", va="center", fontsize=FONT_PT + 1,
                clip_on=False)


def _draw_gaps(ax, gaps: list[tuple[int, int]], n_rows: int) -> None:
    for column, count in gaps:
        ax.axvspan(column + 0.05, column + 0.95, color="#dddddd", zorder=0.5)
        ax.text(column + 0.5, n_rows / 2, f"… {count} layer{'s' if count != 1 else ''} …",
                ha="center", va="center", fontsize=FONT_PT + 1, style="italic", color="#444444")


def _draw_edges(ax, graph: nx.DiGraph, groups: list[Stretch], x: dict[str, int],
                row: dict[str, int]) -> None:
    """Arrows between lanes inside each stretch (an edge within a lane is the row's order)."""
    from matplotlib.patches import FancyArrowPatch

    lane = {n: graph.nodes[n]["task"].lane for n in x}
    for group in groups:
        members = set(group.nodes)
        for src, dst in graph.subgraph(members).edges:
            if lane[src] == lane[dst]:
                continue
            ax.add_patch(FancyArrowPatch(
                (x[src] + 0.5 + BOX_W / 2, row[lane[src]] + 0.5),
                (x[dst] + 0.5 - BOX_W / 2, row[lane[dst]] + 0.5),
                arrowstyle="-|>", mutation_scale=8, linewidth=0.7, color=EDGE_COLOR, alpha=0.75,
                shrinkA=0, shrinkB=0, zorder=1))


def _draw_task(ax, column: int, row: int, task) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((column + (1 - BOX_W) / 2, row + (1 - BOX_H) / 2), BOX_W, BOX_H,
                           facecolor=color_for(task.kind, KIND_COLORS), edgecolor="white",
                           linewidth=0.8, zorder=2, gid=f"box:{task.name}"))
    ax.text(column + 0.5, row + 0.5, wrapped_label(task.label()), ha="center", va="center",
            fontsize=FONT_PT, color="white", zorder=3, linespacing=1.15, gid=f"label:{task.name}")


def _draw_legend(fig, kinds: list[type], title: str | None) -> None:
    """Kinds with their colours and what they do (their docstrings), under the title."""
    from matplotlib.patches import Patch

    if title:
        fig.text(6 / fig.bbox.width, 1 - 8 / fig.bbox.height, title, ha="left", va="top",
                 fontsize=FONT_PT + 3)
    handles = [Patch(color=color_for(k.__name__, KIND_COLORS), label=f"{k.__name__}: {_doc(k)}")
               for k in kinds]
    handles.append(Patch(color=EDGE_COLOR, alpha=0.3, label=(
        "rows: lanes; columns: when each task would start if every task took one time unit; "
        "arrows: a task waits for one on another lane")))
    legend_top = 1 - ((TITLE_PX if title else 0) + 2) / fig.bbox.height
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, legend_top),
               fontsize=FONT_PT, frameon=False, handlelength=1.2, labelspacing=0.35)


def _kind_rank(kind: type) -> tuple[int, str]:
    """Built-in kinds in the usual order (compute, loads, saves), then the others by name."""
    order = list(KIND_COLORS)
    return (order.index(kind.__name__) if kind.__name__ in order else len(order), kind.__name__)


def _doc(kind: type) -> str:
    """The first line of a kind's docstring, without reST markup."""
    return (kind.__doc__ or kind.__name__).strip().splitlines()[0].replace("``", "")
