"""What a benchmark run prints and writes: a plain-text table and one JSON document.

The JSON document is ``{"meta": ..., "workload": ..., "link_gbps": ..., "rows": [...]}``; each row
has at least ``system``, ``schedule`` and either the throughput fields or ``error``. The table shows
the columns BENCH.md asks for; absent values print as ``-``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROW_FIELDS = ("system", "schedule", "prefill_tok_s", "decode_tok_s", "total_tok_s")
_COLUMNS = (  # (header, row key, format)
    ("system", "system", "{}"), ("schedule", "schedule", "{}"),
    ("prefill tok/s", "prefill_tok_s", "{:.1f}"), ("decode tok/s", "decode_tok_s", "{:.2f}"),
    ("total tok/s", "total_tok_s", "{:.2f}"), ("busy %", "compute_busy_frac", "{:.0%}"),
    ("NVML %", "nvml_util_pct", "{:.0f}"), ("H2D GB/s", "achieved_h2d_gbps", "{:.1f}"),
    ("link limit s", "link_limit_s_per_step", "{:.3f}"), ("step s", "step_s", "{:.3f}"),
    ("efficiency", "pipeline_efficiency", "{:.2f}"), ("host ms/step", "host_ms_per_step", "{:.1f}"),
    ("peak GiB", "peak_gpu_gib", "{:.2f}"), ("pinned GiB", "pinned_gib", "{:.2f}"),
)
_GIB_OF = {"peak_gpu_gib": "peak_gpu_nbytes", "pinned_gib": "pinned_nbytes"}  # derived columns


def environment(device: str) -> dict[str, Any]:
    """Date, machine, torch and (on CUDA) card and driver, for the ``meta`` field."""
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "host": platform.node(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "argv": sys.argv,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "device": device}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta.update(card=props.name, card_memory_nbytes=props.total_memory,
                    cuda=torch.version.cuda, driver=_driver_version())
    return meta


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # noqa: BLE001 - informational only
        return None


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if key in _GIB_OF:
        value = row.get(_GIB_OF[key])
        value = None if value is None else value / 2**30
    else:
        value = row.get(key)
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table; failed rows print their error below the table."""
    cells = [[header for header, _, _ in _COLUMNS]]
    for row in rows:
        cells.append([_cell(row, key, fmt) for _, key, fmt in _COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in
                       enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for row in rows:
        if row.get("error"):
            lines.append(f"! {row['system']} {row.get('schedule') or ''}: {row['error']}")
    return "\n".join(lines)


def write_json(document: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``document`` as indented JSON (temp file + rename, so a reader never sees half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
