"""Pictures and files of step graphs: DOT text, PNG/SVG drawings and JSON.

:func:`render` is the entry point (``pipo graph`` calls it): it picks the format from a file suffix
(``.dot``, ``.json``, ``.png``, ``.svg``) or takes a bare format name and returns the content
instead of writing it. Nodes are labelled with their task and coloured by lane, so a reader sees which
activities may overlap.

- DOT is written directly (no pydot); draw it with Graphviz: ``dot -Tsvg step.dot -o step.svg``.
- PNG/SVG use matplotlib alone: nodes are placed by ``networkx.multipartite_layout`` over the
  graph's topological generations (column i holds the tasks whose longest chain of predecessors has
  i tasks), so everything in one column may run at the same time.
- JSON is :func:`pipo.runtime.graph.dumps_graph`, readable back with ``graph_from_json``.

matplotlib is imported only when a picture is drawn; files are written atomically.
"""

from __future__ import annotations

import io
import os
import secrets
import zlib
from pathlib import Path
from typing import Mapping

import networkx as nx

from pipo.runtime.graph import dumps_graph, tasks_in_order
from pipo.runtime.tasks import LANES

FORMATS = ("dot", "json", "png", "svg")

LANE_COLORS = {"compute": "#4C72B0", "load_weight": "#DD8452", "load_kv": "#55A868",
               "save_kv": "#C44E52", "disk": "#8172B3"}
KIND_COLORS = {"Compute": "#4C72B0", "LoadWeight": "#DD8452", "LoadKV": "#55A868",
               "SaveKV": "#C44E52"}
EXTRA_COLORS = ("#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD", "#2CA02C", "#9467BD")


def color_for(name: str, table: Mapping[str, str]) -> str:
    """Colour of a lane or task kind: from ``table``, else a stable pick from a spare palette."""
    if name in table:
        return table[name]
    return EXTRA_COLORS[zlib.crc32(name.encode()) % len(EXTRA_COLORS)]


def ordered_lanes(lanes) -> list[str]:
    """Lane names with the built-in lanes first (in their usual order), then the others sorted."""
    lanes = set(lanes)
    return [lane for lane in LANES if lane in lanes] + sorted(lanes - set(LANES))


def task_label(name: str, sep: str = "\n") -> str:
    """Kind, ``sep``, then the keys without ``-``: ``Compute(L0.attn,1,-,0)`` -> ``Compute``,
    newline, ``L0.attn,1,0``."""
    kind, _, rest = name.partition("(")
    keys = [k for k in rest.rstrip(")").split(",") if k not in ("", "-")]
    return f"{kind}{sep}{','.join(keys)}" if keys else kind


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see the old file or the whole new one, never a half-written one.
    """
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    # open() rather than mkstemp: a new file gets the usual mode (0666 minus umask), not 0600
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def to_dot(graph: nx.DiGraph, title: str = "step") -> str:
    """DOT text of ``graph``: a box per task (label: kind and keys, colour: lane), and a legend."""
    lanes = ordered_lanes(graph.nodes[n]["task"].lane for n in graph)
    lines = [f"digraph {_quote(title)} {{", "  rankdir=LR;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];']
    for task in tasks_in_order(graph):
        label = "\\n".join(_escape(part) for part in task_label(task.name).split("\n"))
        lines.append(f'  {_quote(task.name)} [label="{label}", '
                     f'fillcolor="{color_for(task.lane, LANE_COLORS)}", '
                     f'tooltip={_quote("lane " + task.lane)}];')
    for src, dst in sorted(graph.edges):
        lines.append(f"  {_quote(src)} -> {_quote(dst)};")
    lines += ["  subgraph cluster_legend {", '    label="lanes"; fontname="Helvetica";']
    for lane in lanes:
        lines.append(f'    {_quote("legend:" + lane)} [label={_quote(lane)}, '
                     f'fillcolor="{color_for(lane, LANE_COLORS)}"];')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _quote(text: str) -> str:
    return f'"{_escape(text)}"'


def graph_figure(graph: nx.DiGraph, title: str | None = None):
    """A matplotlib Figure of ``graph``: topological generations left to right, coloured by lane."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    columns = generation_columns(graph)
    tallest = max((len(c) for c in columns), default=1)
    fig = Figure(figsize=(min(2.0 + 1.5 * len(columns), 80.0), 1.8 + 0.75 * tallest), dpi=100)
    ax = fig.add_subplot()
    ax.set_axis_off()
    if columns:
        # a dict of lists keeps our order inside a column (a node attribute would give a set)
        pos = nx.multipartite_layout(graph, subset_key=dict(enumerate(columns)))
        lanes = [graph.nodes[n]["task"].lane for n in graph]
        style = {"ax": ax, "node_size": 1400, "node_shape": "s"}
        nx.draw_networkx_edges(graph, pos, arrowsize=8, width=0.7, edge_color="#555555", **style)
        nx.draw_networkx_nodes(graph, pos, node_color=[color_for(x, LANE_COLORS) for x in lanes],
                               **style)
        nx.draw_networkx_labels(graph, pos, ax=ax, font_size=6, font_color="white",
                                labels={n: task_label(n) for n in graph})
        handles = [Patch(color=color_for(lane, LANE_COLORS), label=lane)
                   for lane in ordered_lanes(lanes)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, 1.0), fontsize=8,
                  title="lane", title_fontsize=8, frameon=False, ncols=len(handles))
    if title:
        ax.set_title(title, fontsize=10, loc="left", pad=22)
    ax.margins(x=0.02, y=0.12)
    return fig


def generation_columns(graph: nx.DiGraph) -> list[list[str]]:
    """Topological generations, each ordered bottom-up so that compute ends on top, then by lane
    and program order (the layout stacks a column's nodes from the bottom)."""
    lane_rank = {lane: i for i, lane in enumerate(
        ordered_lanes(graph.nodes[n]["task"].lane for n in graph))}

    def key(node: str) -> tuple[int, int]:
        return lane_rank[graph.nodes[node]["task"].lane], graph.nodes[node].get("order", 0)

    return [sorted(generation, key=key, reverse=True)
            for generation in nx.topological_generations(graph)]


def figure_bytes(fig, fmt: str) -> bytes:
    """``fig`` saved as ``fmt`` ("png" or "svg"), reproducibly: no timestamp or version stamp, and
    fixed SVG ids, so that regenerated pictures show in a diff only when they changed."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    metadata = {"Software": None} if fmt == "png" else {"Date": None}
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "pipo"}):
        fig.savefig(buf, format=fmt, metadata=metadata, bbox_inches="tight")
    return buf.getvalue()


def graph_png(graph: nx.DiGraph, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw ``graph`` (see :func:`graph_figure`) into a PNG file at ``path``."""
    return atomic_write(path, figure_bytes(graph_figure(graph, title), "png"))


def render(graph: nx.DiGraph, path_or_format: str | os.PathLike,
           title: str | None = None) -> Path | str | bytes:
    """Render ``graph`` by the suffix of a path (write it, return the path) or by a format name.

    ``render(g, "step.png")`` writes a file; ``render(g, "dot")`` (a bare ``str`` format name)
    returns DOT text (``"json"``: text, ``"png"``/``"svg"``: bytes). Supported: ``.dot``, ``.json``,
    ``.png``, ``.svg``; anything else raises ``ValueError``.
    """
    target = os.fspath(path_or_format)
    is_name = isinstance(path_or_format, str) and target.lower() in FORMATS
    fmt = target.lower() if is_name else Path(target).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"cannot render a graph as {target!r}: use a path ending in "
                         f"{', '.join('.' + f for f in FORMATS)} or one of {', '.join(FORMATS)}")
    if fmt == "dot":
        data: str | bytes = to_dot(graph, title or "step")
    elif fmt == "json":
        data = dumps_graph(graph)
    else:
        data = figure_bytes(graph_figure(graph, title), fmt)
    return data if is_name else atomic_write(target, data)
