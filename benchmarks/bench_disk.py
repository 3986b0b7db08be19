"""Disk streaming benchmark (BENCH.md W6): pipo's ``read_block_into`` vs raw O_DIRECT bandwidth.

What it does, in one run:
1. builds an offload store of ``--size-gb`` random fp16 blocks of ``--block-mb`` each in ``--dir``
   (or takes ``--store``);
2. drops the page cache (root only; otherwise says so, and the numbers may include cached reads);
3. raw: reads the store's ``blocks.bin`` front to back with ``os.preadv`` into one large aligned
   buffer, ``O_DIRECT`` - the disk's sequential bandwidth as a plain loop sees it;
4. pipo: reads every block with ``OffloadStore.read_block_into`` through 2 staging buffers in turn,
   while a compute thread keeps one core busy with torch matmuls, sampling RSS every few ms;
5. prints a table and writes JSON to ``--out``: both bandwidths, their ratio (target >= 0.85), and
   peak RSS growth while streaming against the staging budget (2 x the largest block).

Example (from the repo root, pipo importable): ``PYTHONPATH=. python benchmarks/bench_disk.py --out
bench_disk.json`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from pipo.io.aligned import aligned_empty
from pipo.io.spec import ModelSpec
from pipo.io.store import DATA_NAME, OffloadStore, convert

ROW_ELEMENTS = 4096


class RandomBlocks:
    """A WeightSource whose every block is one random fp16 tensor ``w`` of about ``block_nbytes``."""

    path = None
    tokenizer = None

    def __init__(self, n_blocks: int, block_nbytes: int) -> None:
        n_layers = max(0, (n_blocks - 2 + 1) // 2)
        self.spec = ModelSpec(
            family="llama", vocab_size=32000, hidden=ROW_ELEMENTS, n_layers=n_layers, n_heads=32,
            n_kv_heads=32, head_dim=128, ffn=11008, max_positions=4096, name="bench-disk",
        )
        self.rows = max(1, block_nbytes // (ROW_ELEMENTS * 2))

    def read_block(self, block: str) -> dict[str, torch.Tensor]:
        """Fresh random bits (random_ on int16 is fastest; any bit pattern is a valid fp16 blob)."""
        bits = torch.empty(self.rows, ROW_ELEMENTS, dtype=torch.int16).random_()
        return {"w": bits.view(torch.float16)}

    def block_nbytes(self, block: str) -> int:
        """Bytes of every block."""
        return self.rows * ROW_ELEMENTS * 2


def drop_page_cache() -> str:
    """Drop the page cache if we are root; return a note saying what happened."""
    if os.geteuid() != 0:
        return "not root: page cache NOT dropped (numbers may include cached reads)"
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as file:
        file.write("3\n")
    return "page cache dropped"


def raw_direct_gbps(data_path: Path, buffer_nbytes: int) -> float:
    """Sequential O_DIRECT read bandwidth of ``data_path`` with a plain ``os.preadv`` loop."""
    buffer = aligned_empty(buffer_nbytes)
    view = memoryview(buffer.numpy())
    fd = os.open(data_path, os.O_RDONLY | os.O_DIRECT)
    try:
        size_nbytes = os.fstat(fd).st_size
        offset = 0
        start = time.perf_counter()
        while offset < size_nbytes:
            got = os.preadv(fd, [view[: min(buffer_nbytes, size_nbytes - offset)]], offset)
            if got <= 0:
                break
            offset += got
        elapsed_s = time.perf_counter() - start
    finally:
        os.close(fd)
    return offset / elapsed_s / 1e9


def rss_nbytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Background:
    """A compute thread (torch matmuls, one core) and an RSS sampler, both running until stopped."""

    def __init__(self, sample_s: float = 0.005) -> None:
        self.stop = threading.Event()
        self.matmuls = 0
        self.peak_rss_nbytes = rss_nbytes()
        self._sample_s = sample_s
        self._threads = [threading.Thread(target=self._compute), threading.Thread(target=self._sample)]

    def __enter__(self) -> Background:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()

    def _compute(self) -> None:
        a = torch.randn(512, 512)
        while not self.stop.is_set():
            a = torch.tanh(a @ a)
            self.matmuls += 1

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak_rss_nbytes = max(self.peak_rss_nbytes, rss_nbytes())
            time.sleep(self._sample_s)


async def stream_all(store: OffloadStore, buffers: list[torch.Tensor], chunk_nbytes: int, depth: int) -> int:
    """Read every block once through the staging buffers in turn; return the bytes read."""
    total_nbytes = 0
    for i, block in enumerate(store.spec.block_names()):
        await store.read_block_into(block, buffers[i % len(buffers)], chunk_nbytes=chunk_nbytes, depth=depth)
        total_nbytes += store.block_nbytes(block)
    return total_nbytes


def pipo_stream(store: OffloadStore, chunk_nbytes: int, depth: int) -> dict[str, float]:
    """Stream the whole store under a compute load; bandwidth and RSS figures.

    RSS growth is split in two: the staging buffers plus the compute thread's own memory (measured
    once both are warm, before the first read), and what streaming adds on top (should be ~0).
    """
    baseline_nbytes = rss_nbytes()
    buffers = [aligned_empty(store.max_block_nbytes) for _ in range(2)]
    for buffer in buffers:
        buffer.fill_(0)  # fault the staging pages in: they are the budget, not growth
    with Background() as background:
        time.sleep(0.3)  # let the compute thread allocate its workspace
        ready_nbytes = background.peak_rss_nbytes = rss_nbytes()
        matmuls_before = background.matmuls
        start = time.perf_counter()
        total_nbytes = asyncio.run(stream_all(store, buffers, chunk_nbytes, depth))
        elapsed_s = time.perf_counter() - start
        matmuls = background.matmuls - matmuls_before
    return {
        "pipo_gbps": total_nbytes / elapsed_s / 1e9,
        "pipo_elapsed_s": elapsed_s,
        "matmuls_per_s": matmuls / elapsed_s,
        "staging_budget_nbytes": 2 * store.max_block_nbytes,
        "rss_ready_growth_nbytes": ready_nbytes - baseline_nbytes,
        "rss_peak_growth_nbytes": background.peak_rss_nbytes - baseline_nbytes,
        "rss_streaming_growth_nbytes": background.peak_rss_nbytes - ready_nbytes,
        "direct": bool(store.direct),
    }


def build_store(work_dir: Path, size_gb: float, block_mb: float) -> tuple[Path, float]:
    """Convert a RandomBlocks source of about ``size_gb`` into ``work_dir/store``; (path, seconds)."""
    block_nbytes = int(block_mb * 2**20)
    n_blocks = max(2, round(size_gb * 1e9 / block_nbytes))
    start = time.perf_counter()
    path = convert(RandomBlocks(n_blocks, block_nbytes), work_dir / "store", overwrite=True)
    return path, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print a table and return (and optionally write) the JSON record."""
    args = parse_args(argv)
    torch.set_num_threads(1)  # the compute thread gets one core; the other is left for I/O
    work_dir = Path(args.dir or tempfile.mkdtemp(prefix="pipo-bench-disk-"))
    build_s = 0.0
    store_path = Path(args.store) if args.store else None
    try:
        if store_path is None:
            store_path, build_s = build_store(work_dir, args.size_gb, args.block_mb)
        cache_note = drop_page_cache()
        raw_gbps = raw_direct_gbps(store_path / DATA_NAME, int(args.raw_buffer_mb * 2**20))
        drop_page_cache()
        with OffloadStore(store_path) as store:
            record = {
                "date": time.strftime("%Y-%m-%d"),
                "store_nbytes": (store_path / DATA_NAME).stat().st_size,
                "n_blocks": len(store.spec.block_names()),
                "max_block_nbytes": store.max_block_nbytes,
                "chunk_nbytes": int(args.chunk_mb * 2**20),
                "depth": args.depth,
                "build_s": build_s,
                "page_cache": cache_note,
                "raw_direct_gbps": raw_gbps,
                **pipo_stream(store, int(args.chunk_mb * 2**20), args.depth),
            }
    finally:
        if not args.store and not args.keep:
            shutil.rmtree(work_dir if not args.dir else work_dir / "store", ignore_errors=True)
    record["ratio"] = record["pipo_gbps"] / record["raw_direct_gbps"]
    print_table(record)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return record


def print_table(record: dict) -> None:
    """Human-readable summary of one run."""
    mib = 2**20
    rows = [
        ("store", f"{record['store_nbytes'] / 1e9:.2f} GB in {record['n_blocks']} blocks "
                  f"(max {record['max_block_nbytes'] / mib:.0f} MiB), built in {record['build_s']:.1f} s"),
        ("page cache", record["page_cache"]),
        ("raw O_DIRECT preadv", f"{record['raw_direct_gbps']:.2f} GB/s"),
        ("pipo read_block_into", f"{record['pipo_gbps']:.2f} GB/s (O_DIRECT={record['direct']}, chunk "
                                 f"{record['chunk_nbytes'] / mib:.0f} MiB, depth {record['depth']})"),
        ("ratio (target >= 0.85)", f"{record['ratio']:.3f}"),
        ("compute thread", f"{record['matmuls_per_s']:.0f} matmuls/s (512x512 fp32, 1 thread)"),
        ("staging budget", f"{record['staging_budget_nbytes'] / mib:.0f} MiB (2 buffers)"),
        ("RSS peak growth", f"{record['rss_peak_growth_nbytes'] / mib:.1f} MiB (buffers + compute "
                            f"thread {record['rss_ready_growth_nbytes'] / mib:.1f} MiB before streaming, "
                            f"+{record['rss_streaming_growth_nbytes'] / mib:.1f} MiB while streaming)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="where to build the store (default: a new temp dir)")
    parser.add_argument("--store", help="use this existing store instead of building one")
    parser.add_argument("--size-gb", type=float, default=2.0, help="store size to build")
    parser.add_argument("--block-mb", type=float, default=64.0, help="block size to build, MiB")
    parser.add_argument("--chunk-mb", type=float, default=8.0, help="read_block_into chunk, MiB")
    parser.add_argument("--depth", type=int, default=4, help="read_block_into reads in flight")
    parser.add_argument("--raw-buffer-mb", type=float, default=64.0, help="raw loop read size, MiB")
    parser.add_argument("--keep", action="store_true", help="keep the built store")
    parser.add_argument("--out", help="write the JSON record here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
