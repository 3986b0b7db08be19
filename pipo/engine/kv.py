"""The KV cache of a run: resident on the compute device, or on the host with device KV slots.

Attention sees K and V of shape [rows, n_kv_heads, capacity, head_dim] per (layer, micro-batch)
(see ``pipo.ops.rows``), ``capacity = plan.max_len + 1``: the last position is the *trash* slot
that a step's padding tokens write into and attention never reads (:func:`capacity`). Resident, they
are stored that way. Offloaded, the host copy and the device slots are both position-major
[capacity, rows, n_kv_heads, head_dim] and attention gets a permuted
view of the slot: a LoadKV task copies the first ``start`` positions into one of
``plan.n_kv_slots`` device slots and SaveKV copies this step's entries back, each a single
contiguous copy (one DMA on CUDA) with no staging tensor, no transpose and no allocation.

Offloaded, the full cache lives in one host :class:`~pipo.runtime.memory.HostArena` (page-locked
as a whole on CUDA, exactly its size). With ``plan.kv_disk`` it lives in a memory-mapped scratch
file instead of RAM (for caches larger than RAM; the kernel pages it in and out). The file is
unlinked as soon as it is mapped, so no run ever leaves one behind, and it is never read by a later
run. :meth:`KVCache.close` releases the arena.
"""

from __future__ import annotations

import math
import os
import tempfile

import torch

from pipo.io.spec import ModelSpec
from pipo.plan import Plan
from pipo.runtime import memory
from pipo.runtime.memory import HostArena, PinRegistrar, align_up

KV_ALIGN_NBYTES = 256


def capacity(plan: Plan) -> int:
    """Cache positions per row: ``plan.max_len`` real ones and the trash slot at ``plan.max_len``."""
    return plan.max_len + 1


def micro_rows(plan: Plan, micro: int) -> int:
    """Rows (sequences) in micro-batch ``micro``; the last one may be smaller."""
    return min(plan.micro_batch, plan.batch - micro * plan.micro_batch)


class KVCache:
    """K/V tensors for every (layer, micro-batch) pair, placed per the plan.

    ``registrar`` page-locks the offloaded cache (default: cudaHostRegister on CUDA, nothing on CPU).
    """

    def __init__(self, spec: ModelSpec, plan: Plan, *, device: torch.device, dtype: torch.dtype,
                 disk_dir: str | None = None, registrar: PinRegistrar | None = None):
        self.plan = plan
        self.arena: HostArena | None = None
        keys = [(layer, m) for layer in range(spec.n_layers) for m in range(plan.n_micro)]
        if not plan.kv_offloaded:
            shape = (spec.n_kv_heads, capacity(plan), spec.head_dim)
            self.home = {k: _pair(torch.zeros, (micro_rows(plan, k[1]), *shape), device, dtype)
                         for k in keys}
            self.slots: list[dict[int, tuple]] = []  # per slot, per row count: position-major (k, v)
        else:
            shapes = {k: (capacity(plan), micro_rows(plan, k[1]), spec.n_kv_heads, spec.head_dim)
                      for k in keys}
            if plan.kv_disk:
                self.home = _disk_pairs(shapes, dtype, disk_dir)
            else:
                registrar = registrar if registrar is not None else memory.default_registrar(device)
                self.arena, self.home = _arena_pairs(shapes, dtype, registrar)
            self.slots = [_slot_views(spec, plan, device, dtype) for _ in range(plan.n_kv_slots)]
        # attention's [rows, nkv, capacity, hd] views of the position-major slots
        self._attention_views = [{rows: tuple(t.permute(1, 2, 0, 3) for t in pair)
                                  for rows, pair in slot.items()} for slot in self.slots]
        self.slot_holds: list[tuple[int, int] | None] = [None] * len(self.slots)

    def for_compute(self, layer: int, micro: int, slot: int | None) -> tuple[torch.Tensor, ...]:
        """The (k, v) tensors attention reads and appends to: [rows, n_kv_heads, capacity, head_dim]."""
        if slot is None:
            return self.home[(layer, micro)]
        self.slot_holds[slot] = (layer, micro)
        return self._attention_views[slot][micro_rows(self.plan, micro)]

    def load(self, layer: int, micro: int, slot: int, start: int) -> None:
        """Copy the first ``start`` cached positions of (layer, micro) into KV ``slot``."""
        rows = micro_rows(self.plan, micro)
        for src, dst in zip(self.home[(layer, micro)], self.slots[slot][rows]):
            dst[:start].copy_(src[:start], non_blocking=True)  # [start, rows, nkv, hd]: one DMA
        self.slot_holds[slot] = (layer, micro)

    def save(self, layer: int, micro: int, slot: int, start: int, t: int) -> None:
        """Copy positions ``start .. start+t`` of KV ``slot`` back to the host cache."""
        if self.slot_holds[slot] != (layer, micro):
            raise RuntimeError(f"KV slot {slot} holds {self.slot_holds[slot]}, not "
                               f"{(layer, micro)}: the step graph lacks an ordering edge")
        rows = micro_rows(self.plan, micro)
        for dst, src in zip(self.home[(layer, micro)], self.slots[slot][rows]):
            dst[start:start + t].copy_(src[start:start + t], non_blocking=True)  # one DMA

    def nbytes(self) -> int:
        """Bytes of the full cache (wherever it lives)."""
        return sum(t.numel() * t.element_size() for pair in self.home.values() for t in pair)

    @property
    def pinned_nbytes(self) -> int:
        """Page-locked host bytes of the offloaded cache."""
        return self.arena.pinned_nbytes if self.arena is not None else 0

    def close(self) -> None:
        """Unpin and drop the cache and the slots."""
        self.home, self.slots, self._attention_views = {}, [], []
        if self.arena is not None:
            self.arena.close()


def _pair(make, shape, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(make(shape, device=device, dtype=dtype) for _ in range(2))


def _slot_views(spec: ModelSpec, plan: Plan, device, dtype) -> dict[int, tuple]:
    """One device KV slot: flat K and V buffers for a full micro-batch, viewed position-major
    [capacity, rows, nkv, hd] for each row count the micro-batches have (a contiguous prefix each)."""
    per_row = capacity(plan) * spec.n_kv_heads * spec.head_dim
    flat = _pair(torch.zeros, (plan.micro_batch * per_row,), device, dtype)
    row_counts = {micro_rows(plan, m) for m in range(plan.n_micro)}
    return {rows: tuple(t[:rows * per_row].view(capacity(plan), rows, spec.n_kv_heads, spec.head_dim)
                        for t in flat) for rows in row_counts}


def _arena_pairs(shapes: dict, dtype: torch.dtype, registrar: PinRegistrar | None
                 ) -> tuple[HostArena, dict]:
    """K/V pairs of the given shapes carved from one host arena of exactly their size, pinned."""
    nbytes = {key: math.prod(shape) * dtype.itemsize for key, shape in shapes.items()}
    arena = HostArena(sum(2 * align_up(n, KV_ALIGN_NBYTES) for n in nbytes.values()), registrar,
                      name="kv")
    pairs = {key: tuple(arena.take(nbytes[key], KV_ALIGN_NBYTES).view(dtype).view(shape)
                        for _ in range(2)) for key, shape in shapes.items()}
    arena.pin()
    return arena, pairs


def _disk_pairs(shapes: dict, dtype: torch.dtype, directory: str | None) -> dict:
    """K/V pairs of the given shapes as views into one memory-mapped, already unlinked file."""
    numels = [math.prod(shape) for shape in shapes.values()]
    total = 2 * sum(numels)
    fd, path = tempfile.mkstemp(prefix="pipo-kv-", suffix=".bin", dir=directory)
    try:
        os.ftruncate(fd, total * dtype.itemsize)
        flat = torch.from_file(path, shared=True, size=total, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)
    pairs, offset = {}, 0
    for key, shape, numel in zip(shapes, shapes.values(), numels):
        k = flat[offset:offset + numel].view(shape)
        v = flat[offset + numel:offset + 2 * numel].view(shape)
        pairs[key], offset = (k, v), offset + 2 * numel
    return pairs
