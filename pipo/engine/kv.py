"""The KV cache of a run: resident on the compute device, or on the host with device KV slots.

Layout per (layer, micro-batch): K and V of shape [rows, n_kv_heads, max_len, head_dim] on the
compute device (see ``pipo.ops.layers``); the offloaded host copy is position-major
[max_len, rows, n_kv_heads, head_dim] so every transfer is one contiguous copy. Offloaded, the full cache lives in host memory (pinned on CUDA); a
LoadKV task copies the first ``start`` positions into one of ``plan.n_kv_slots`` device slots, the
attention block appends this step's entries there, and SaveKV copies just those entries back.
"""

from __future__ import annotations

import torch

from pipo.io.spec import ModelSpec
from pipo.plan import Plan


def micro_rows(plan: Plan, micro: int) -> int:
    """Rows (sequences) in micro-batch ``micro``; the last one may be smaller."""
    return min(plan.micro_batch, plan.batch - micro * plan.micro_batch)


class KVCache:
    """K/V tensors for every (layer, micro-batch) pair, placed per the plan."""

    def __init__(self, spec: ModelSpec, plan: Plan, *, device: torch.device, dtype: torch.dtype):
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

        self.home = {(layer, m): _pair(home_shape(m), home, dtype, pin)
                     for layer in range(spec.n_layers) for m in range(plan.n_micro)}
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
