"""int4 matmul benchmark: pipo's kernels against torch fp16 and against the device's own bandwidth.

For every weight shape (out x in) and batch it times, with CUDA events on one stream:
- ``int4``: ``pipo.ops.int4_dispatch.int4_matmul`` (fused GEMV up to its batch threshold, else
  dequantize into a dense matrix + ``F.linear``) and its effective bandwidth = packed bytes / time;
- ``gemv``: the fused GEMV kernel alone (batches it supports);
- ``deq+mm``: dequantize kernel + ``F.linear`` at every batch;
- ``fp16``: ``F.linear`` with a dense fp16 weight (bytes = 2 per element);
- ``host us``: host time per GEMV launch (no sync; what the engine's compute lane pays), with the
  weight arguments wrapped per call and with them cached as an engine's ``Int4Workspace`` does.
The dequantize kernel alone is timed once per shape (``deq GB/s``: packed bytes read + fp16 written).
The device bandwidth is a large device-to-device copy (bytes read + written / time); ``%bw`` is the
int4 path's effective bandwidth as a fraction of it. Weights are random codes with fp16 scales/mins.

Usage: ``PYTHONPATH=. python benchmarks/bench_int4.py --out bench_int4.json`` (needs a CUDA device;
without one it says so and exits 1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

SHAPES = ((4096, 4096), (16384, 4096), (4096, 16384), (14336, 4096))
BATCHES = (1, 2, 4, 8, 16, 32)
COPY_NBYTES = 1 << 30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the results as JSON to this path")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES],
                   help="weight shapes as OUTxIN")
    return p.parse_args(argv)


def copy_gbps(repeats: int) -> float:
    """Device memory bandwidth seen by a large device-to-device copy (read + write bytes)."""
    import torch

    from pipo.ops.kernels.checks import time_cuda_s

    src = torch.empty(COPY_NBYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    elapsed_s = time_cuda_s(lambda: dst.copy_(src), repeats)
    return 2 * COPY_NBYTES / elapsed_s / 1e9


def bench_shape(out_f: int, in_f: int, batches: list[int], group_size: int, repeats: int) -> list[dict]:
    """Every measurement for one weight shape, one row per batch."""
    import torch
    import torch.nn.functional as F

    from pipo.ops.int4_dispatch import GEMV_MAX_BATCH, Int4Workspace, dequant_matmul, int4_matmul
    from pipo.ops.kernels import checks, dequant_int4, gemv_int4

    q = checks.random_quant(out_f, in_f, group_size, torch.device("cuda"))
    padded = torch.empty(out_f, q.in_padded, dtype=torch.float16, device="cuda")
    dequant_s = checks.time_cuda_s(lambda: dequant_int4.dequant_int4(q, padded), repeats)
    w16 = padded[:, :in_f].contiguous()
    cached = Int4Workspace().weight_arrays(q)
    rows = []
    for batch in batches:
        x = checks.random_activations(batch, in_f, torch.float16, torch.device("cuda"))
        int4_s = checks.time_cuda_s(lambda: int4_matmul(x, q), repeats)
        gemv_s = (checks.time_cuda_s(lambda: gemv_int4.gemv_int4(x, q), repeats)
                  if batch <= gemv_int4.MAX_BATCH else None)
        host_us = (host_us_per_call(lambda: gemv_int4.gemv_int4(x, q), repeats),
                   host_us_per_call(lambda: gemv_int4.gemv_int4(x, q, weights=cached), repeats)) \
            if batch <= gemv_int4.MAX_BATCH else (None, None)
        deq_s = checks.time_cuda_s(lambda: dequant_matmul(x, q), repeats)
        fp16_s = checks.time_cuda_s(lambda: F.linear(x, w16), repeats)
        rows.append({
            "out": out_f, "in": in_f, "batch": batch,
            "path": "gemv" if batch <= min(GEMV_MAX_BATCH, gemv_int4.MAX_BATCH) else "deq+mm",
            "int4_s": int4_s, "int4_gbps": q.nbytes / int4_s / 1e9, "gemv_s": gemv_s, "deq_mm_s": deq_s,
            "fp16_s": fp16_s, "fp16_gbps": w16.numel() * 2 / fp16_s / 1e9, "int4_nbytes": q.nbytes,
            "speedup_vs_fp16": fp16_s / int4_s, "gemv_host_us": host_us[0],
            "gemv_host_cached_us": host_us[1], "dequant_s": dequant_s,
            "dequant_gbps": (q.nbytes + padded.numel() * 2) / dequant_s / 1e9,
        })
    return rows


def host_us_per_call(fn, repeats: int) -> float:
    """Median host microseconds per call of ``fn`` (launches only: nothing waits for the GPU)."""
    import statistics
    import time

    import torch

    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(times)


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _host(us: float | None) -> str:
    return "-" if us is None else f"{us:.1f}"


def print_table(rows: list[dict], device_gbps: float) -> None:
    """One line per (shape, batch)."""
    head = f"{'shape':>12} {'B':>3} {'path':>7} {'int4 us':>9} {'GB/s':>7} {'%bw':>5} {'gemv us':>9} " \
           f"{'deq+mm us':>10} {'fp16 us':>9} {'fp16 GB/s':>9} {'x fp16':>7} {'deq GB/s':>8} " \
           f"{'host us':>8} {'cached':>7}"
    print(head)
    for r in rows:
        print(f"{r['out']:>6}x{r['in']:<5} {r['batch']:>3} {r['path']:>7} {_us(r['int4_s']):>9} "
              f"{r['int4_gbps']:>7.0f} {100 * r['int4_gbps'] / device_gbps:>4.0f}% {_us(r['gemv_s']):>9} "
              f"{_us(r['deq_mm_s']):>10} {_us(r['fp16_s']):>9} {r['fp16_gbps']:>9.0f} {r['speedup_vs_fp16']:>6.2f}x "
              f"{r['dequant_gbps']:>8.0f} {_host(r['gemv_host_us']):>8} {_host(r['gemv_host_cached_us']):>7}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 1 without a CUDA device."""
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_int4 needs a CUDA device", file=sys.stderr)
        return 1
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    device_gbps = copy_gbps(args.repeats)
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {device_gbps:.0f} GB/s, group {args.group_size}")
    rows = [r for out_f, in_f in shapes for r in bench_shape(out_f, in_f, args.batches, args.group_size,
                                                             args.repeats)]
    print_table(rows, device_gbps)
    if args.out:
        result = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__, "group_size": args.group_size, "copy_gbps": device_gbps,
                  "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
