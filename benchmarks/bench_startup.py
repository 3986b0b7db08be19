"""Start-up benchmark: time to first token of ``pipo generate`` against llama.cpp on the same GGUF.

Every run is a fresh process timed from spawn to its first generated token on stdout:
- ``pipo``: ``python -m pipo.cli generate --model GGUF -n 1 PROMPT`` (pipo echoes the prompt with the
  first piece, so the first byte on stdout is the first token); optionally also with ``--weights int4``
  and with another checkout's pipo (``--baseline-root DIR``, e.g. a worktree of an older commit);
- ``llama.cpp``: ``python -m pipo.bench.llama_cpp GGUF PROMPT`` (llama-cpp-python: import, ``Llama(...)``
  load, one token), whose own import / load / first-token times are reported beside.
Runners alternate within each repeat (one untimed warm-up each first, so the page cache is warm for
all); the table shows medians and each runner's ratio to llama.cpp. Target: pipo <= 3x llama.cpp.

Usage: ``PYTHONPATH=. python benchmarks/bench_startup.py [--repeats 5] [--out startup.json]``.
Without llama-cpp-python its row says ``not installed: pip install -e .[llama]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"
TARGET_RATIO = 3.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the default model's)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per runner (median)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--int4", action="store_true", help="also time pipo with --weights int4")
    p.add_argument("--baseline-root", type=Path, default=None,
                   help="also time the pipo of this checkout (its directory goes on PYTHONPATH)")
    p.add_argument("--out", help="write the results as JSON to this path")
    return p.parse_args(argv)


def pipo_first_token_s(root: Path, model: str, prompt: str, extra: list[str]) -> float:
    """Seconds from spawning ``pipo generate -n 1`` (code of ``root``) to its first byte on stdout."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "pipo.cli", "generate", "--model", model, "-n", "1", *extra, prompt]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=root)
    first = proc.stdout.read(1)
    elapsed_s = time.perf_counter() - start
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"pipo run failed: {err.decode(errors='replace').strip()[-500:]}")
    return elapsed_s


def runners(args: argparse.Namespace, model: str) -> dict:
    """Name -> a function doing one timed run and returning ``{"wall_s": ..., ...}``."""
    from pipo.bench import llama_cpp

    table = {"pipo": lambda: {"wall_s": pipo_first_token_s(REPO, model, args.prompt, [])}}
    if args.int4:
        table["pipo --weights int4"] = lambda: {
            "wall_s": pipo_first_token_s(REPO, model, args.prompt, ["--weights", "int4"])}
    if args.baseline_root is not None:
        root = args.baseline_root.resolve()
        table[f"pipo @ {root.name}"] = lambda: {"wall_s": pipo_first_token_s(root, model, args.prompt, [])}
    if llama_cpp.available():
        table["llama.cpp"] = lambda: llama_cpp.first_token_in_subprocess(model, args.prompt)
    return table


def measure(table: dict, repeats: int) -> dict[str, list[dict]]:
    """One warm-up per runner, then ``repeats`` rounds with the runners alternating."""
    for run in table.values():
        run()
    samples: dict[str, list[dict]] = {name: [] for name in table}
    for _ in range(repeats):
        for name, run in table.items():
            samples[name].append(run())
    return samples


def summarize(samples: dict[str, list[dict]]) -> list[dict]:
    """One row per runner: median / min / max wall time, other keys' medians, ratio to llama.cpp."""
    rows = []
    for name, runs in samples.items():
        row = {"runner": name, **{key: statistics.median(r[key] for r in runs) for key in runs[0]},
               "min_s": min(r["wall_s"] for r in runs), "max_s": max(r["wall_s"] for r in runs)}
        rows.append(row)
    llama = next((r["wall_s"] for r in rows if r["runner"] == "llama.cpp"), None)
    for row in rows:
        row["ratio_to_llama_cpp"] = None if llama is None else row["wall_s"] / llama
    return rows


def print_table(rows: list[dict], llama_missing: str | None) -> None:
    """The result table on stdout."""
    print(f"{'runner':<26} {'first token s':>13} {'min':>7} {'max':>7} {'x llama.cpp':>11}")
    for row in rows:
        ratio = "" if row["ratio_to_llama_cpp"] is None else f"{row['ratio_to_llama_cpp']:.2f}"
        print(f"{row['runner']:<26} {row['wall_s']:>13.3f} {row['min_s']:>7.3f} {row['max_s']:>7.3f} {ratio:>11}")
        if row["runner"] == "llama.cpp":
            print(f"{'  of which in-process:':<26} import {row['import_s']:.3f} s, load {row['load_s']:.3f} s, "
                  f"first token {row['first_token_s']:.3f} s")
    if llama_missing:
        print(f"{'llama.cpp':<26} {llama_missing}")
    print(f"target: pipo <= {TARGET_RATIO:g}x llama.cpp; medians of alternating fresh-process runs")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write JSON."""
    from pipo.bench import llama_cpp
    from pipo.io.default_model import default_model_path

    args = parse_args(argv)
    model = str(args.model or default_model_path())
    samples = measure(runners(args, model), args.repeats)
    rows = summarize(samples)
    missing = None if llama_cpp.available() else llama_cpp.INSTALL_HINT
    print_table(rows, missing)
    if args.out:
        result = {"benchmark": "startup", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "model": model, "prompt": args.prompt, "repeats": args.repeats, "cpu_count": os.cpu_count(),
                  "load_average": os.getloadavg(), "rows": rows, "samples": samples, "llama_cpp": missing or "ok"}
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
