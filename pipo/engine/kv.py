"""The KV cache of a run: resident on the compute device, or on the host with device KV slots.

Layout per (layer, micro-batch): K and V of shape [rows, n_kv_heads, max_len, head_dim] on the
compute device (see ``pipo.ops.layers``); the offloaded host copy is position-major
[max_len, rows, n_kv_heads, head_dim] so every transfer is one contiguous copy. Offloaded, the
full cache lives in host memory (pinned on CUDA); a LoadKV task copies the first ``start``
positions into one of ``plan.n_kv_slots`` device slots, the attention block appends this step's
entries there, and SaveKV copies just those entries back.

With ``plan.kv_disk`` the offloaded cache lives in a memory-mapped scratch file instead of RAM
(for caches larger than RAM; the kernel pages it in and out). The file is unlinked as soon as it is
mapped, so no run ever leaves one behind, and it is never read by a later run.
"""

from __future__ import annotations

import math
import os
import tempfile

import torch

from pipo.io.spec import ModelSpec
from pipo.plan import Plan


def micro_rows(plan: Plan, micro: int) -> int:
    """Rows (sequences) in micro-batch ``micro``; the last one may be smaller."""
    return min(plan.micro_batch, plan.batch - micro * plan.micro_batch)


class KVCache:
    """K/V tensors for every (layer, micro-batch) pair, placed per the plan."""

    def __init__(self, spec: ModelSpec, plan: Plan, *, device: torch.device, dtype: torch.dtype,
                 disk_dir: str | None = None):
        self.plan = plan
        shape = (spec.n_kv_heads, plan.max_len, spec.head_dim)
        home = torch.device("cpu") if plan.kv_offloaded else device
        pin = plan.kv_offloaded and device.type == "cuda"
        # Offloaded, the host copy is position-major [max_len, rows, n_kv_heads, head_dim]: the
        # prefix LoadKV copies and the entries SaveKV writes back are each one contiguous block, so
        # both are single pinned DMA copies (a strided host copy would be staged through pageable
        # memory and block the host until the stream catches up).
        def home_shape(m: int) -> tuple[int, ...]:
            rows = micro_rows(plan, m)
            if plan.kv_offloaded:
                return (plan.max_len, rows, spec.n_kv_heads, spec.head_dim)
            return (rows, *shape)

        keys = [(layer, m) for layer in range(spec.n_layers) for m in range(plan.n_micro)]
        if plan.kv_offloaded and plan.kv_disk:
            self.home = _disk_pairs({k: home_shape(k[1]) for k in keys}, dtype, disk_dir)
        else:
            self.home = {k: _pair(home_shape(k[1]), home, dtype, pin) for k in keys}
        n_slots = plan.n_kv_slots if plan.kv_offloaded else 0
        self.slots = [_pair((plan.micro_batch, *shape), device, dtype, False) for _ in range(n_slots)]
        self.slot_holds: list[tuple[int, int] | None] = [None] * n_slots

    def for_compute(self, layer: int, micro: int, slot: int | None) -> tuple[torch.Tensor, ...]:
        """The (k, v) tensors attention reads and appends to."""
        if slot is None:
            return self.home[(layer, micro)]
        rows = micro_rows(self.plan, micro)
        self.slot_holds[slot] = (layer, micro)
        return tuple(t[:rows] for t in self.slots[slot])

    def load(self, layer: int, micro: int, slot: int, start: int) -> None:
        """Copy the first ``start`` cached positions of (layer, micro) into KV ``slot``."""
        rows = micro_rows(self.plan, micro)
        for src, dst in zip(self.home[(layer, micro)], self.slots[slot]):
            staged = torch.empty(src[:start].shape, dtype=src.dtype, device=dst.device)
            staged.copy_(src[:start], non_blocking=True)           # [start, rows, nkv, hd]: one DMA
            dst[:rows, :, :start].copy_(staged.permute(1, 2, 0, 3))  # device-side transpose
        self.slot_holds[slot] = (layer, micro)

    def save(self, layer: int, micro: int, slot: int, start: int, t: int) -> None:
        """Copy positions ``start .. start+t`` of KV ``slot`` back to the host cache."""
        if self.slot_holds[slot] != (layer, micro):
            raise RuntimeError(f"KV slot {slot} holds {self.slot_holds[slot]}, not "
                               f"{(layer, micro)}: the step graph lacks an ordering edge")
        rows = micro_rows(self.plan, micro)
        for dst, src in zip(self.home[(layer, micro)], self.slots[slot]):
            entries = src[:rows, :, start:start + t].permute(2, 0, 1, 3).contiguous()  # [t, rows, ...]
            dst[start:start + t].copy_(entries, non_blocking=True)  # one DMA

    def nbytes(self) -> int:
        """Bytes of the full cache (wherever it lives)."""
        return sum(t.numel() * t.element_size() for pair in self.home.values() for t in pair)


def _pair(shape, device, dtype, pin) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.zeros(shape, device=device, dtype=dtype, pin_memory=pin) for _ in range(2))


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
