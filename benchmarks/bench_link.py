"""Host<->GPU link: time to pin host memory, and pinned H2D / D2H bandwidth. Table + JSON.

Rows (JSON rewritten after each, so a cut-off run keeps what it measured):
- ``pin``: pinning ``--pin-gib`` GiB two ways: ``torch.empty(pin_memory=True)`` (torch's caching
  host allocator, one ``cudaHostAlloc``) and a pageable allocation registered with
  ``cudaHostRegister`` (what an exact-size arena would use); seconds and GiB/s;
- ``h2d`` / ``d2h``: a ``--copy-mib`` MiB pinned buffer copied to / from the device with
  ``non_blocking=True`` on one stream, timed with CUDA events (median of ``--repeats``);
- ``h2d_pageable``: the same copy from pageable memory, for contrast.

``--dry-run`` runs on a CPU build: host-to-host copies of a small buffer stand in for every row
(no pinning: a CPU build cannot pin), to check the script and its output.

Usage: ``python benchmarks/bench_link.py --out link.json`` on the GPU machine;
``python benchmarks/bench_link.py --dry-run --out link.json`` anywhere.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

GIB, MIB = 2**30, 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the rows as JSON to this path (after every row)")
    p.add_argument("--pin-gib", type=float, default=16.0, help="GiB to pin (default 16)")
    p.add_argument("--copy-mib", type=int, default=1024, help="MiB per timed copy (default 1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed copies per row (median)")
    p.add_argument("--dry-run", action="store_true", help="CPU only: host copies of 64 MiB")
    return p.parse_args(argv)


def time_pin_s(nbytes: int, how: str) -> float:
    """Seconds to get ``nbytes`` of pinned host memory ``how`` ("alloc" or "register")."""
    import torch

    t0 = time.perf_counter()
    if how == "alloc":
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    else:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        code = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        if int(code) != 0:
            raise RuntimeError(f"cudaHostRegister failed with code {int(code)}")
    elapsed_s = time.perf_counter() - t0
    if how == "register":
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
    del buffer
    return elapsed_s


def time_copy_s(copy: Callable[[], None], repeats: int, on_cuda: bool) -> float:
    """Median seconds of ``copy()`` (CUDA events on a GPU, perf_counter on a CPU)."""
    if on_cuda:
        from pipo.ops.kernels.checks import time_cuda_s

        return time_cuda_s(copy, repeats, warmup=1)
    copy()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_rows(nbytes: int, repeats: int, dry_run: bool):
    """Yield the h2d, d2h and pageable-h2d rows."""
    import torch

    device = torch.device("cpu" if dry_run else "cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=not dry_run)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
    cases = (("h2d", on_device, pinned), ("d2h", pinned, on_device), ("h2d_pageable", on_device, pageable))
    for name, dst, src in cases:
        elapsed_s = time_copy_s(lambda: dst.copy_(src, non_blocking=True), repeats, not dry_run)
        yield {"row": name, "nbytes": nbytes, "elapsed_s": elapsed_s, "gbps": nbytes / elapsed_s / 1e9}


def pin_rows(nbytes: int, dry_run: bool):
    """Yield one row per way of pinning (skipped in a dry run: a CPU build cannot pin)."""
    for how in ("alloc", "register"):
        if dry_run:
            yield {"row": f"pin_{how}", "nbytes": nbytes, "skipped": "dry run: a CPU build cannot pin"}
            continue
        elapsed_s = time_pin_s(nbytes, how)
        yield {"row": f"pin_{how}", "nbytes": nbytes, "elapsed_s": elapsed_s,
               "gibps": nbytes / GIB / elapsed_s}


def describe(row: dict) -> str:
    """One table line for ``row``."""
    if "skipped" in row:
        return f"{row['row']:14} SKIP ({row['skipped']})"
    speed = f"{row['gbps']:8.1f} GB/s" if "gbps" in row else f"{row['gibps']:8.2f} GiB/s pinned"
    return f"{row['row']:14} {row['nbytes'] / GIB:7.2f} GiB {row['elapsed_s']:9.4f} s {speed}"


def main(argv: list[str] | None = None) -> int:
    """Measure every row, print it, rewrite the JSON after each."""
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench_link: torch sees no CUDA device; run on the GPU machine or pass --dry-run",
              file=sys.stderr)
        return 2
    copy_nbytes = 64 * MIB if args.dry_run else args.copy_mib * MIB
    pin_nbytes = 64 * MIB if args.dry_run else int(args.pin_gib * GIB)
    result = {"bench": "link", "dry_run": args.dry_run,
              "device": "cpu" if args.dry_run else torch.cuda.get_device_name(), "rows": []}
    rows = itertools.chain(pin_rows(pin_nbytes, args.dry_run),
                           copy_rows(copy_nbytes, args.repeats, args.dry_run))
    for row in rows:  # measured one at a time, so the JSON grows row by row
        print(describe(row), flush=True)
        result["rows"].append(row)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
