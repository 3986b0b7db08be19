"""``pipo probe``: measure this machine in seconds and fit the numbers the cost model needs.

- Links: a copy of a 64 MiB buffer into a device slot and back (on a CPU: a memcpy between two
  host buffers, which is what a LoadWeight does there), from pinned and from pageable memory.
- Disk: block reads of a scratch offload store on the file system of ``disk_dir`` (the store's)
  through the engine's own read path, page cache bypassed, fitted as a fixed cost per block plus
  bytes / bandwidth (:mod:`pipo.planner.probe_disk`).
- Compute: the blocks as the engine runs them (:mod:`pipo.ops.layers`; attention over packed
  rows, :mod:`pipo.ops.rows`) on random blocks of three llama shapes (a 135M-class one and two
  wider ones) at a few token counts and context lengths; a non-negative least-squares fit of
  :class:`~pipo.planner.profile.ComputeFit` (:mod:`pipo.planner.costs` has the features). Each
  timed call computes on the next of several copies of the block, together twice the last-level
  cache, so that its weights come from memory as a model's layers do (one after another, each
  read once per step); a block timed on the same weights over and over reads them from the cache
  and runs 15-90 % faster than the engine does.
- Overheads: the scheduler running a chain of no-op tasks on the loop's lane and on a thread's
  lane (per task), and the host's per-step work (logits to host, greedy sampling).
Every time is the median of a few repeats, so a profile taken on a shared machine carries that
machine's typical contention, as the runs after it will.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
from pathlib import Path
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from pipo.io.spec import ModelSpec
from pipo.planner.costs import compute_features
from pipo.planner.fit import nnls
from pipo.planner.probe_disk import disk_read_cost
from pipo.planner.profile import ComputeFit, Profile, hardware_key
from pipo.runtime import Executors, GraphBuilder, Runtime, Task
from pipo.runtime.tasks import COMPUTE, LOAD_WEIGHT

COPY_NBYTES = 64 * 2**20
FALLBACK_CACHE_NBYTES = 64 * 2**20
# weights larger than a CPU's last-level cache, as a model's are (they stream from DRAM)
SHAPES = (ModelSpec("llama", vocab_size=49152, hidden=576, n_layers=1, n_heads=9, n_kv_heads=3,
                    head_dim=64, ffn=1536, max_positions=4096),
          ModelSpec("llama", vocab_size=16000, hidden=1024, n_layers=1, n_heads=16, n_kv_heads=4,
                    head_dim=64, ffn=2816, max_positions=4096),
          ModelSpec("llama", vocab_size=16000, hidden=2048, n_layers=1, n_heads=32, n_kv_heads=8,
                    head_dim=64, ffn=5632, max_positions=4096))
POINTS = ((1, 1, 64), (1, 1, 1024), (2, 1, 128), (4, 1, 64), (8, 1, 256), (32, 1, 256),
          (1, 64, 64), (4, 128, 128))


def probe(device: str = "cpu", dtype: str = "float32", disk_dir: str | None = None) -> Profile:
    """Measure this machine; a :class:`Profile` (not yet saved)."""
    dev, dt = torch.device(device), getattr(torch, dtype)
    h2d_pinned, h2d_pageable = _copy_bps(dev, to_device=True)
    d2h_pinned, d2h_pageable = _copy_bps(dev, to_device=False)
    disk_block_s, disk_bps = disk_read_cost(disk_dir or tempfile.gettempdir())
    cold, hot = fit_compute(dev, dt)
    return Profile(key=hardware_key(device, dtype), device=device, dtype=dtype,
                   h2d_pinned_bps=h2d_pinned, h2d_pageable_bps=h2d_pageable,
                   d2h_pinned_bps=d2h_pinned, d2h_pageable_bps=d2h_pageable,
                   disk_read_bps=disk_bps, disk_block_s=disk_block_s,
                   task_overhead_s=task_overhead_s(COMPUTE),
                   thread_task_overhead_s=task_overhead_s(LOAD_WEIGHT),
                   step_overhead_s=_step_overhead_s(dev), compute=cold, compute_hot=hot,
                   cache_nbytes=cache_nbytes(dev))


def _median_s(fn, repeats: int = 5, sync=None) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(dev: torch.device):
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None


def _copy_bps(dev: torch.device, to_device: bool) -> tuple[float, float]:
    """(pinned, pageable) bytes per second of one direction; on a CPU both are a memcpy."""
    slot = torch.empty(COPY_NBYTES, dtype=torch.uint8, device=dev).fill_(1)
    rates = []
    for pinned in (True, False):
        host = torch.empty(COPY_NBYTES, dtype=torch.uint8, pin_memory=pinned and dev.type == "cuda")
        host.fill_(2)
        src, dst = (host, slot) if to_device else (slot, host)
        seconds = _median_s(partial(dst.copy_, src, non_blocking=True), repeats=7,
                            sync=_sync(dev))
        rates.append(COPY_NBYTES / seconds)
    return rates[0], rates[1]


def task_overhead_s(lane: str, n_tasks: int = 300) -> float:
    """Seconds the scheduler adds per task on ``lane`` (CPU lanes: compute runs on the event
    loop, load_weight on a worker thread): a chain of no-op tasks there."""
    table = Executors()
    table.register(_Nop, lambda task, ctx: None)
    b = GraphBuilder()
    previous: list[str] = []
    for i in range(n_tasks):
        previous = [b.add(_Nop(i, lane=lane), after=previous)]
    with Runtime(executors=table) as runtime:
        program = runtime.compile(b.graph)
        return _median_s(lambda: runtime.run(program), repeats=3) / n_tasks


def _step_overhead_s(dev: torch.device) -> float:
    """Host work per step besides the tasks: logits of 8 rows to the host and greedy sampling."""
    logits = torch.randn(8, 32000, device=dev)
    return _median_s(lambda: torch.argmax(logits.float().cpu(), dim=-1), sync=_sync(dev))


@dataclass(frozen=True, slots=True)
class _Nop(Task):
    """A task that does nothing: the probe of the scheduler's own cost."""

    i: int


def fit_compute(dev: torch.device, dtype: torch.dtype) -> tuple[ComputeFit, ComputeFit]:
    """Time pipo's block functions on random blocks and fit two :class:`ComputeFit`: with the
    weights coming from memory (the next of several copies each call) and with them hot in the
    cache (the same copy again, as a step's later micro-batches find them)."""
    rows, cold, hot = [], [], []
    for spec in SHAPES:
        blocks = _random_blocks(spec, dev, dtype)
        for part in ("attn", "mlp", "head"):
            copies = weight_copies(blocks[part], 2 * cache_nbytes(dev))
            for b, t, context in _points(part):
                for ws, times in ((copies, cold), (copies[:1], hot)):
                    run = _block_call(spec, part, ws, b, t, context, dev, dtype)
                    times.append(_median_s(run, repeats=5, sync=_sync(dev)))
                rows.append(compute_features(spec, part, b, t, context, dtype.itemsize, None))
            del copies
    a = np.array(rows, dtype=float)
    return tuple(ComputeFit(*map(float, nnls(a, np.array(t, dtype=float)))) for t in (cold, hot))


def _points(part: str) -> list[tuple[int, int, int]]:
    """The (rows, new tokens, context) points timed for ``part``: all of them for attention, one
    per (rows, tokens) elsewhere (context matters to attention only)."""
    if part == "attn":
        return list(POINTS)
    firsts = {}
    for b, t, context in POINTS:
        firsts.setdefault((b, t), (b, t, context))
    return list(firsts.values())


def cache_nbytes(dev: torch.device) -> int:
    """The last-level cache in front of ``dev``'s memory: a GPU's L2, else the CPU's largest cache
    (sysfs); 64 MiB when neither is known."""
    if dev.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)
                   or FALLBACK_CACHE_NBYTES)
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=FALLBACK_CACHE_NBYTES)


def weight_copies(w: dict, total_nbytes: int) -> list[dict]:
    """``w`` and enough copies of it that together they hold at least ``total_nbytes``."""
    nbytes = sum(v.numel() * v.element_size() for v in w.values() if isinstance(v, torch.Tensor))
    n = max(2, -(-total_nbytes // max(nbytes, 1)))
    return [w] + [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in w.items()}
                  for _ in range(n - 1)]


def _random_blocks(spec: ModelSpec, dev: torch.device, dtype: torch.dtype) -> dict:
    from pipo.bench.random_model import RandomModel
    from pipo.engine.weights import prepare_block

    model = RandomModel(spec, dtype=dtype)
    return {part: {k: v.to(dev) for k, v in prepare_block(model.read_block(block), dtype, None)
                   .items()}
            for part, block in (("attn", "L0.attn"), ("mlp", "L0.mlp"), ("head", "head"))}


def _block_call(spec, part, copies, b, t, context, dev, dtype):
    """A no-argument call of one block as the engine runs it: ``b`` rows of ``t`` new tokens each,
    packed 1-D (:mod:`pipo.ops.rows`), attention spanning ``context`` positions per row; each call
    computes on the next of the weight ``copies``."""
    from pipo.ops import layers
    from pipo.ops.rope import rope_tables
    from pipo.ops.rows import pack_rows, row_attention_block, row_attention_inputs

    ws = itertools.cycle(copies)
    x = torch.randn(1, b * t, spec.hidden, device=dev, dtype=dtype)   # [1, b*t, hidden] packed
    if part == "mlp":
        return lambda: layers.mlp_block(next(ws), x, spec)
    if part == "head":
        last = torch.arange(t - 1, b * t, t, device=dev)  # each row's last token, gathered
        return lambda: layers.head(next(ws), x[0, last], spec)        # as the engine does
    start = max(context - t, 0)
    trash = start + t  # the cache's last slot, as pipo.engine.kv lays it out
    rows = pack_rows([(row, start, t) for row in range(b)], b * t, trash, b).to(lambda v: v.to(dev))
    k = torch.zeros(b, spec.n_kv_heads, trash + 1, spec.head_dim, device=dev, dtype=dtype)
    v = torch.zeros_like(k)
    prep = row_attention_inputs(rows, spec, rope_tables(spec, trash, dev, dtype), dtype)
    return lambda: row_attention_block(next(ws), x, k, v, prep, spec)
