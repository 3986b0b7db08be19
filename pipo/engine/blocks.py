"""One block's tensors merged into one flat byte buffer, and back as zero-copy views.

Streaming a block is then a single copy (host buffer -> slot buffer; on CUDA one pinned H2D copy),
whatever number of tensors it has. A :class:`BlockLayout` records where each tensor lives in the
buffer; quantized records (``QuantTensor``, ``Q8Tensor``, ``PackedInt4``) are stored as their parts
and rebuilt as views of the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ALIGN_NBYTES = 256  # keeps every tensor view aligned for vectorized kernels


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored tensor: ``name`` (``"wq"`` or ``"wq.qweight"`` for a quant part) and its place."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class QuantMeta:
    """How to rebuild one ``QuantTensor`` from its stored parts."""

    name: str
    shape: tuple[int, int]
    group_size: int
    parts: tuple[str, ...]
    kind: type  # the record class (QuantTensor, Q8Tensor, PackedInt4, ...)


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """Where every tensor of a block lives inside its flat buffer."""

    entries: tuple[Entry, ...]
    quant: tuple[QuantMeta, ...]
    nbytes: int


def _flatten(tensors: dict) -> tuple[list[tuple[str, torch.Tensor]], list[QuantMeta]]:
    flat, quant = [], []
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            flat.append((name, value))
            continue
        parts = value.to_parts()
        quant.append(QuantMeta(name, tuple(value.shape), value.group_size, tuple(parts), type(value)))
        flat += [(f"{name}.{part}", t) for part, t in parts.items()]
    return flat, quant


def layout_of(tensors: dict) -> BlockLayout:
    """The layout that :func:`pack_into` uses for ``tensors`` (tensors and QuantTensors)."""
    flat, quant = _flatten(tensors)
    entries, offset = [], 0
    for name, t in flat:
        nbytes = t.numel() * t.element_size()
        entries.append(Entry(name, t.dtype, tuple(t.shape), offset, nbytes))
        offset += -(-nbytes // ALIGN_NBYTES) * ALIGN_NBYTES
    return BlockLayout(tuple(entries), tuple(quant), offset)


def pack_into(tensors: dict, layout: BlockLayout, buffer: torch.Tensor) -> None:
    """Copy ``tensors`` into the uint8 ``buffer`` at the places ``layout`` gives."""
    flat, _ = _flatten(tensors)
    for (name, t), entry in zip(flat, layout.entries, strict=True):
        view = buffer[entry.offset:entry.offset + entry.nbytes]
        view.copy_(t.contiguous().reshape(-1).view(torch.uint8))


def views(buffer: torch.Tensor, layout: BlockLayout) -> dict:
    """The block's tensors as views into ``buffer`` (QuantTensors rebuilt from their parts)."""
    out = {}
    for e in layout.entries:
        out[e.name] = buffer[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
    for q in layout.quant:
        parts = {p: out.pop(f"{q.name}.{p}") for p in q.parts}
        out[q.name] = q.kind.from_parts(parts, q.shape, q.group_size)
    return out


def pack(tensors: dict, allocate: Callable[[int], torch.Tensor] | None = None
         ) -> tuple[torch.Tensor, BlockLayout]:
    """A flat buffer holding ``tensors``, and its layout.

    ``allocate(nbytes)`` gives the uint8 buffer (default: a new CPU tensor); the engine passes its
    host arena's :meth:`~pipo.runtime.memory.HostArena.take`, so blocks share one pinned region.
    """
    layout = layout_of(tensors)
    buffer = allocate(layout.nbytes) if allocate else torch.empty(layout.nbytes, dtype=torch.uint8)
    pack_into(tensors, layout, buffer)
    return buffer, layout


def rebase(tensors: dict, source: torch.Tensor, target: torch.Tensor) -> dict:
    """The same tensors as views into ``target``, at the offsets they had inside ``source``.

    For blocks copied whole from one flat buffer to another (disk staging -> device slot).
    """
    base = source.data_ptr()

    def moved(t: torch.Tensor) -> torch.Tensor:
        offset = t.data_ptr() - base
        nbytes = t.numel() * t.element_size()
        return target[offset:offset + nbytes].view(t.dtype).view(t.shape)

    out = {}
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            out[name] = moved(value)
        else:
            parts = {k: moved(v) for k, v in value.to_parts().items()}
            out[name] = type(value).from_parts(parts, value.shape, value.group_size)
    return out
