"""Ray overhead benchmark (issue 15): ``pipo generate --ray`` with 2 workers against 2 processes.

What it does, in one run, on one machine:
1. writes ``--prompts`` short prompts (3 to 12 words) as JSONL, and the file's two halves;
2. starts a local Ray cluster in this process (2 x ``--threads`` CPUs, no dashboard)
   and reports how long that took, apart: a cluster is started once for many jobs;
3. alternates, ``--repeats`` times: (a) 2 independent ``pipo generate --input HALF`` processes at
   once, ``--threads`` threads each; (b) one ``pipo generate --input ALL --ray ADDRESS --workers
   2`` against that cluster. Each is timed from launch to the last process's exit: Python start,
   model loading and writing the file included on both sides, as a user sees it;
4. prints a table and writes JSON to ``--out``: prompts/s of each (median wall time), their ratio
   (target >= 0.9) and whether Ray's file equals the two halves' files joined, byte for byte.

Example (from the repo root, pipo and the ray extra installed): ``PYTHONPATH=. python
benchmarks/bench_ray.py --out bench_ray.json`` (several minutes on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKERS = 2  # as many as the processes it is compared with, each on half of the file
WORDS = ("the a cat dog sun moon river city tree light quick brown fox jumps over lazy old new red "
         "blue green small big house road").split()


def write_prompts(directory: Path, n_prompts: int) -> tuple[Path, Path, Path]:
    """``all.jsonl`` and its halves ``a.jsonl``, ``b.jsonl``: short random prompts, fixed seed."""
    rng = random.Random(0)
    lines = [json.dumps({"id": i, "prompt": " ".join(rng.choice(WORDS)
                                                    for _ in range(rng.randint(3, 12)))}) + "\n"
             for i in range(n_prompts)]
    paths = directory / "all.jsonl", directory / "a.jsonl", directory / "b.jsonl"
    for path, part in zip(paths, (lines, lines[:n_prompts // 2], lines[n_prompts // 2:])):
        path.write_text("".join(part))
    return paths


def generate_command(args, src: Path, out: Path, *extra: str) -> list[str]:
    """The ``pipo generate --input`` command line both sides run."""
    model = ["--model", args.model] if args.model else []
    return [sys.executable, "-m", "pipo.cli", "generate", *model, "--input", str(src),
            "--output", str(out), "-n", str(args.new_tokens), "--batch-size",
            str(args.batch_size), "--threads", str(args.threads), *extra]


def timed(commands: list[list[str]]) -> float:
    """Wall seconds from launching ``commands`` together until the last one exits (each must
    succeed)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in commands]
    for proc, command in zip(procs, commands):
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}\n{err}")
    return time.perf_counter() - start


def start_cluster(n_cpus: int) -> tuple[str, float]:
    """A local Ray cluster owned by this process (stopped when it exits): address, start-up s."""
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=n_cpus, include_dashboard=False, logging_level="ERROR")
    return ray.get_runtime_context().gcs_address, time.perf_counter() - start


def measure(args, directory: Path) -> dict:
    """Both sides, alternating; wall times and whether the outputs agree."""
    all_src, a_src, b_src = write_prompts(directory, args.prompts)
    address, cluster_s = start_cluster(WORKERS * args.threads)
    halves = [generate_command(args, a_src, directory / "a.out"),
              generate_command(args, b_src, directory / "b.out")]
    on_ray = generate_command(args, all_src, directory / "ray.out", "--ray", address,
                              "--workers", str(WORKERS))
    walls = {"processes": [], "ray": []}
    for _ in range(args.repeats):
        walls["processes"].append(timed(halves))
        walls["ray"].append(timed([on_ray]))
    joined = (directory / "a.out").read_text() + (directory / "b.out").read_text()
    return {"cluster_start_s": cluster_s, "walls_s": walls,
            "identical": joined == (directory / "ray.out").read_text()}


def report(args, result: dict) -> dict:
    """Print the table; the JSON record."""
    median = {side: statistics.median(w) for side, w in result["walls_s"].items()}
    rate = {side: args.prompts / wall for side, wall in median.items()}
    ratio = rate["ray"] / rate["processes"]
    print(f"{args.prompts} prompts, -n {args.new_tokens}, batch {args.batch_size}, "
          f"{args.threads} thread(s) per worker/process; Ray cluster started in "
          f"{result['cluster_start_s']:.1f} s (not counted); load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| run | wall s (median) | prompts/s | vs 2 processes | output equal |")
    print("|---|---|---|---|---|")
    print(f"| 2 x `pipo generate --input HALF` | {median['processes']:.1f} | "
          f"{rate['processes']:.2f} | 1.00x | - |")
    print(f"| `pipo generate --ray --workers {WORKERS}` | {median['ray']:.1f} | "
          f"{rate['ray']:.2f} | {ratio:.2f}x | {'yes' if result['identical'] else 'NO'} |")
    return {"prompts": args.prompts, "new_tokens": args.new_tokens,
            "batch_size": args.batch_size, "threads": args.threads, "workers": WORKERS,
            "model": args.model or "default", "prompts_per_s": rate, "ratio": ratio,
            "target_ratio": 0.9, "load_average": os.getloadavg(), **result}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print the table, write ``--out``."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pipo-bench-ray-") as tmp:
        record = report(args, measure(args, Path(tmp)))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=200, help="prompts in all (default: 200)")
    parser.add_argument("-n", "--new-tokens", type=int, default=32,
                        help="new tokens per prompt at most (default: 32)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per process and per worker (default: 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternations of the two sides; medians count (default: 1)")
    parser.add_argument("--model", default=None, help="model path (default: pipo's default)")
    parser.add_argument("--out", default="bench_ray.json",
                        help="JSON record path, empty for none (default: bench_ray.json)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
