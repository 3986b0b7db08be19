"""Disk-streamed CPU generation (``--placement disk``) against the disk's raw O_DIRECT bandwidth.

One run: the store's bytes per token (every block is read from disk once per step; an embedding
table read by rows counts the rows it read per step), the raw
sequential O_DIRECT bandwidth of its ``blocks.bin`` (``bench_disk.raw_direct_gbps``), then a greedy
generation with every block on disk (decode seconds per token), alternated ``--repeats`` times.
``disk floor`` = bytes per token / raw bandwidth; ``efficiency`` = floor / measured s per token
(1.0 = generation runs at the disk's speed). Build the store first, e.g.
``pipo convert default STORE --weights int4``.

Usage: ``PYTHONPATH=. python benchmarks/bench_disk_generate.py STORE --out disk_gen.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_disk import drop_page_cache, raw_direct_gbps

from pipo.bench import cpu


def main(argv=None) -> dict:
    """Measure; print one line per repeat and a summary; write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", type=Path)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from pipo.engine import Engine, EngineOptions
    from pipo.io.source import open_model

    source = open_model(args.store)
    engine = Engine(cpu._NoEos(source), EngineOptions(placement="disk"))
    prompt = engine.tokenizer.encode(cpu.PROMPTS[0])
    engine.generate_ids([prompt], 2)  # warm-up (places the weights)
    by_rows = getattr(engine._weights, "row_tables", {})  # blocks whose tables are read by rows
    whole = sum(source.block_nbytes(b) for b in source.spec.block_names() if b not in by_rows)
    tables = [t for block in by_rows.values() for t in block.values()]
    raws, steps, row_nbytes = [], [], []
    cache = drop_page_cache()
    for _ in range(args.repeats):
        raws.append(raw_direct_gbps(args.store / "blocks.bin", 64 << 20))
        before = sum(t.nbytes_read for t in tables)
        gen = engine.generate_ids([prompt], args.tokens)
        steps.append(gen.decode_s / (gen.steps - 1))
        row_nbytes.append((sum(t.nbytes_read for t in tables) - before) / gen.steps)
        print(f"raw {raws[-1]:.2f} GB/s, {steps[-1] * 1e3:.1f} ms/token", flush=True)
    engine.close()
    raw, step_s = statistics.median(raws), statistics.median(steps)
    per_token = whole + statistics.median(row_nbytes)
    floor_s = per_token / (raw * 1e9)
    record = {"store": str(args.store), "weights": engine.options.weights, "bytes_per_token": per_token,
              "whole_blocks_nbytes": whole, "rows_nbytes_per_token": per_token - whole,
              "raw_gbps": raw, "s_per_token": step_s, "disk_floor_s": floor_s,
              "efficiency": floor_s / step_s, "effective_gbps": per_token / step_s / 1e9,
              "page_cache": cache, "raw_all": raws, "s_per_token_all": steps}
    print(f"{per_token / 1e6:.1f} MB/token, raw {raw:.2f} GB/s, {step_s * 1e3:.1f} ms/token "
          f"(floor {floor_s * 1e3:.1f} ms), efficiency {record['efficiency']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
