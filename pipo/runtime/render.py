"""Pictures and files of step graphs: DOT text, PNG/SVG drawings and JSON.

:func:`render` is the entry point (``pipo graph`` calls it): it picks the format from a file suffix
(``.dot``, ``.json``, ``.png``, ``.svg``) or takes a bare format name and returns the content
instead of writing it. Tasks are labelled by ``Task.label()`` (``load L0.attn → slot 1``).

- DOT is written directly (no pydot), the whole graph, coloured by lane; draw it with Graphviz:
  ``dot -Tsvg step.dot -o step.svg``.
- PNG/SVG use matplotlib alone (:mod:`pipo.runtime.picture`): one row per lane, time left to
  right, a legend; deep models show some layers (``layers=``) and elide the middle.
- JSON is :func:`pipo.runtime.graph.dumps_graph`, readable back with ``graph_from_json``.

matplotlib is imported only when a picture is drawn; files are written atomically.
"""

from __future__ import annotations

import io
import os
import secrets
import zlib
from pathlib import Path
from typing import Iterable, Mapping

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
    """DOT text of ``graph``: a box per task (label: ``Task.label()``, colour: lane), a legend."""
    lanes = ordered_lanes(graph.nodes[n]["task"].lane for n in graph)
    lines = [f"digraph {_quote(title)} {{", "  rankdir=LR;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];']
    for task in tasks_in_order(graph):
        lines.append(f'  {_quote(task.name)} [label={_quote(task.label())}, '
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


def graph_png(graph: nx.DiGraph, path: str | os.PathLike, title: str | None = None,
              layers: Iterable[int] | None = None) -> Path:
    """Draw ``graph`` (see :func:`pipo.runtime.picture.graph_figure`) into a PNG file."""
    from pipo.runtime.picture import graph_figure

    return atomic_write(path, figure_bytes(graph_figure(graph, title, layers), "png"))


def render(graph: nx.DiGraph, path_or_format: str | os.PathLike, title: str | None = None,
           layers: Iterable[int] | None = None) -> Path | str | bytes:
    """Render ``graph`` by the suffix of a path (write it, return the path) or by a format name.

    ``render(g, "step.png")`` writes a file; ``render(g, "dot")`` (a bare ``str`` format name)
    returns DOT text (``"json"``: text, ``"png"``/``"svg"``: bytes). Supported: ``.dot``, ``.json``,
    ``.png``, ``.svg``; anything else raises ``ValueError``. ``layers`` picks the model layers a
    picture shows (default: all of a shallow model, else the first two and the last); DOT and JSON
    always hold the whole graph.
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
        from pipo.runtime.picture import graph_figure

        data = figure_bytes(graph_figure(graph, title, layers), fmt)
    return data if is_name else atomic_write(target, data)
