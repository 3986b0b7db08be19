"""The disk lane's cost, probed through the engine's own read path.

A scratch offload store of a small random model (blocks of three sizes, 0.6-11 MB, ~170 MB in
all) is written on the file system of the store's directory, its pages dropped from the page cache,
and each block is read once with :meth:`~pipo.io.store_read.OffloadStore.read_block_into` exactly
as the engine's disk lane reads it (:data:`~pipo.engine.weights.DISK_CHUNK_NBYTES` pieces,
:data:`~pipo.engine.weights.DISK_DEPTH` in flight, ``O_DIRECT`` where the file system allows it,
else buffered reads that drop each blob's pages once read). The per-block times are fitted as
``fixed_s + nbytes / bps``: what one ``ReadBlock`` (or unstaged disk ``LoadWeight``) costs.

:func:`with_store_reads` times the same reads on the blocks of the store a plan will stream
(up to :data:`STORE_SAMPLE_NBYTES` of them, once per store and process): a model's own file is what
the disk lane reads, and on a virtual disk its rate can differ from a fresh scratch file's.

Every timed read is of bytes not read before, and the store is larger than a virtual disk's
cache tends to be: rereading a small scratch store measured 1.1-2.3 GB/s on a VM whose passes over
a 651 MB store ran at 0.85-1.05 GB/s (the host's cache below the guest serves the rereads).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from pipo.io.spec import ModelSpec
from pipo.io.store_format import DATA_NAME
from pipo.planner.fit import nnls

# embed / head ~0.6 MB, attention ~3.5 MB, MLP ~10.6 MB (fp32), in 12 layers: ~170 MB in all
SCRATCH_SPEC = ModelSpec("llama", vocab_size=256, hidden=576, n_layers=12, n_heads=9, n_kv_heads=3,
                         head_dim=64, ffn=1536, max_positions=64)
WARMUP_BLOCKS = 3  # read first and not timed: they start the executor's threads
STORE_SAMPLE_NBYTES = 256 * 2**20


def disk_read_cost(directory: str, spec: ModelSpec = SCRATCH_SPEC) -> tuple[float, float]:
    """``(fixed_s, bps)`` of one block read by the engine from a store in ``directory``."""
    from pipo.bench.random_model import RandomModel
    from pipo.io.store import OffloadStore, convert

    scratch = Path(tempfile.mkdtemp(prefix=".pipo-probe-", dir=directory))
    try:
        path = convert(RandomModel(spec), scratch / "store", weights="fp32")
        _drop_cached(path / "blocks.bin")
        with OffloadStore(path) as store:
            sizes, seconds = _timed_reads(store, spec.block_names())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return fit_block_reads(sizes, seconds)


def with_store_reads(profile, store):
    """``profile`` with its disk fields measured on ``store``'s own blocks (:func:`store_read_cost`)."""
    from dataclasses import replace

    fixed_s, bps = store_read_cost(store)
    return replace(profile, disk_block_s=fixed_s, disk_read_bps=bps)


def store_read_cost(store) -> tuple[float, float]:
    """``(fixed_s, bps)`` of the engine's block reads from ``store`` itself: its blocks in file
    order (the embedding left out: it is read by rows), up to ``STORE_SAMPLE_NBYTES``, page cache
    dropped, each read once. Measured once per store file (path, size, mtime) in a process."""
    data = store.path / DATA_NAME
    stat = data.stat()
    key = (str(data.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _STORE_COSTS:
        blocks, total = [], 0
        for entry in sorted(store.index.blocks, key=lambda e: e.offset_nbytes):
            if entry.name != "embed" and (total < STORE_SAMPLE_NBYTES or len(blocks) <= WARMUP_BLOCKS):
                blocks.append(entry.name)
                total += entry.nbytes
        _drop_cached(data)
        _STORE_COSTS[key] = fit_block_reads(*_timed_reads(store, blocks))
    return _STORE_COSTS[key]


_STORE_COSTS: dict[tuple, tuple[float, float]] = {}


def _drop_cached(data_path: Path) -> None:
    """Evict the freshly written file's pages, so no read below is served from memory."""
    fd = os.open(data_path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed_reads(store, blocks: list[str]) -> tuple[list[int], list[float]]:
    """Block sizes and the seconds of reading each once, one after another as the disk lane goes
    (the first ``WARMUP_BLOCKS`` untimed)."""
    from pipo.engine.weights import DISK_CHUNK_NBYTES, DISK_DEPTH
    from pipo.io.store import aligned_empty

    buffer = aligned_empty(store.max_block_nbytes)
    seconds: list[float] = []

    async def one_pass() -> None:
        for block in blocks:
            t0 = time.perf_counter()
            await store.read_block_into(block, buffer, chunk_nbytes=DISK_CHUNK_NBYTES,
                                        depth=DISK_DEPTH)
            seconds.append(time.perf_counter() - t0)

    asyncio.run(one_pass())  # one event loop and executor, as the runtime keeps
    timed = slice(min(WARMUP_BLOCKS, len(blocks) - 1), None)
    return [store.block_nbytes(b) for b in blocks][timed], seconds[timed]


def fit_block_reads(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Fit ``seconds = fixed_s + nbytes / bps`` (non-negative, relative error);
    ``(fixed_s, bps)``."""
    a = np.column_stack([np.ones(len(sizes)), np.asarray(sizes, dtype=float)])
    fixed_s, s_per_byte = nnls(a, np.asarray(seconds, dtype=float))
    if s_per_byte <= 0:  # only the fixed cost explains the times: charge it per byte instead
        s_per_byte, fixed_s = sum(seconds) / sum(sizes), 0.0
    return float(fixed_s), float(1.0 / s_per_byte)
