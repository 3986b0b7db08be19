"""Task durations from a machine profile: the cost model the simulator replays.

- Weight loads: block bytes / link bandwidth (host -> device, pinned on a GPU; a memcpy on a CPU),
  or, when the disk lane reads a block (``ReadBlock``, unstaged disk loads), the probed cost of the
  engine's block read: ``disk_block_s`` + block bytes / ``disk_read_bps``; with ``embed_rows``
  a disk-tier embedding moves nothing there and its compute reads its tokens' rows (bytes /
  ``disk_read_bps``).
- KV loads and saves: the bytes of the positions they move (the cache before ``start``; this
  step's ``t`` new entries) / link bandwidth.
- Compute: :class:`~pipo.planner.profile.ComputeFit` · :func:`compute_features`, with the
  profile's ``compute`` fit (weights read from memory) for a block's first micro-batch of the step
  and its ``compute_hot`` fit for the later ones when the block fits the last-level cache (they
  find its weights there).
- Every task also pays the scheduler's overhead: ``thread_task_overhead_s`` on a CPU copy lane (a
  worker thread's round trip), ``task_overhead_s`` elsewhere.
``link_bps`` caps both link directions (``--link-gbps``), as the token bucket on the lanes does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import astuple

from pipo.io.spec import ModelSpec, block_layer, block_part
from pipo.plan import Plan, estimate_block_nbytes
from pipo.planner.profile import Profile
from pipo.runtime.tasks import (
    COMPUTE,
    DISK,
    Compute,
    LoadKV,
    LoadWeight,
    ReadBlock,
    SaveKV,
    Task,
)

OPS_PER_PART = {"embed": 1, "attn": 6, "mlp": 3, "head": 2}
# products of 1-2 rows run at a matrix-vector kernel's speed; from 3 rows on a CPU's matrix-matrix
# kernel reads the weights at about half that rate until the flops dominate (measured: a head over
# 4 or 8 rows takes 2-3.5x one row's time)
GEMM_MIN_ROWS = 3


def compute_features(spec: ModelSpec, part: str, rows: int, t: int, context: int,
                     dtype_nbytes: int, int4_group: int | None,
                     sizes: Mapping[str, int] | None = None) -> list[float]:
    """The features of one block compute, in :class:`ComputeFit` field order: operations, weight
    bytes read, 2·tokens·weights, 2·tokens·context·query width (attention), tokens·hidden, and the
    weight bytes again when the products have :data:`GEMM_MIN_ROWS` rows or more.

    ``rows`` sequences of ``t`` new tokens each, attending over ``context`` positions; the head runs
    on each row's last token only. ``sizes``: the placed block sizes, when not the plain estimate.
    """
    block = {"embed": "embed", "head": "head"}.get(part, f"L0.{part}")
    weight_nbytes = (sizes or estimate_block_nbytes(spec, dtype_nbytes, int4_group))[block]
    n_weights = estimate_block_nbytes(spec, 1)[block]
    tokens = rows if part == "head" else rows * t
    if part == "embed":
        return [1.0, 0.0, 0.0, 0.0, float(tokens * spec.hidden), 0.0]
    attn = 2.0 * rows * t * context * spec.n_heads * spec.head_dim if part == "attn" else 0.0
    return [float(OPS_PER_PART[part]), float(weight_nbytes), 2.0 * tokens * n_weights, attn,
            float(tokens * spec.hidden), float(weight_nbytes) if tokens >= GEMM_MIN_ROWS else 0.0]


def link_bps(profile: Profile, to_device: bool, cap_bps: float | None = None) -> float:
    """Bandwidth of one link direction (pinned on a GPU; a memcpy on a CPU), capped by ``cap_bps``."""
    bps = profile.h2d_pinned_bps if to_device else profile.d2h_pinned_bps
    return min(bps, cap_bps) if cap_bps else bps


def task_durations(spec: ModelSpec, plan: Plan, profile: Profile, *, start: int, t: int,
                   dtype_nbytes: int, int4_group: int | None = None,
                   cap_bps: float | None = None,
                   sizes: Mapping[str, int] | None = None,
                   embed_rows: bool = False) -> Callable[[Task], float]:
    """``duration(task) -> seconds`` for one step that writes positions ``start .. start+t-1``;
    ``sizes``: the placed block sizes (default: :func:`~pipo.plan.estimate_block_nbytes`);
    ``embed_rows``: a disk-tier embedding is read by rows (see the module docstring)."""
    sizes = sizes or estimate_block_nbytes(spec, dtype_nbytes, int4_group)
    rows_read = embed_rows and dict(plan.placement).get("embed") == DISK
    row_s = spec.hidden * dtype_nbytes / profile.disk_read_bps  # one embedding row, read by rows
    h2d, d2h = link_bps(profile, True, cap_bps), link_bps(profile, False, cap_bps)
    kv_per_pos = 2 * spec.n_kv_heads * spec.head_dim * dtype_nbytes  # K and V of one row, 1 layer
    fits = (astuple(profile.compute), astuple(profile.compute_hot or profile.compute))
    cache: dict[tuple, float] = {}
    on_cpu = profile.device == "cpu"

    def rows(micro: int) -> int:
        return min(plan.micro_batch, plan.batch - micro * plan.micro_batch)

    def compute_s(task: Compute) -> float:
        hot = task.micro > 0 and sizes[task.block] <= profile.cache_nbytes
        key = (block_part(task.block), rows(task.micro), hot)
        if key not in cache:
            feats = compute_features(spec, key[0], key[1], t, start + t, dtype_nbytes, int4_group,
                                     sizes)
            cache[key] = sum(c * f for c, f in zip(fits[hot], feats, strict=True))
            if rows_read and key[0] == "embed":
                cache[key] += key[1] * t * row_s
        return cache[key]

    def duration(task: Task) -> float:
        if isinstance(task, Compute):
            seconds = compute_s(task)
        elif rows_read and isinstance(task, ReadBlock | LoadWeight) and task.block == "embed":
            seconds = 0.0  # the compute reads the rows
        elif isinstance(task, ReadBlock) or (isinstance(task, LoadWeight) and task.lane == DISK):
            seconds = profile.disk_block_s + sizes[task.block] / profile.disk_read_bps
        elif isinstance(task, LoadWeight):
            seconds = sizes[task.block] / h2d
        elif isinstance(task, LoadKV):
            seconds = rows(task.micro) * start * kv_per_pos / h2d
        elif isinstance(task, SaveKV):
            seconds = rows(task.micro) * t * kv_per_pos / d2h
        else:
            seconds = 0.0
        threaded = on_cpu and task.lane not in (COMPUTE, DISK)  # a worker thread's round trip
        return seconds + (profile.thread_task_overhead_s if threaded else profile.task_overhead_s)

    return duration


def layer_of(task: Task) -> int | None:
    """The model layer a task works on (``None`` for embed, head and unknown kinds)."""
    block = getattr(task, "block", None)
    return block_layer(block) if block is not None else getattr(task, "layer", None)
