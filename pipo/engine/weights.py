"""Weights placed per the plan: resident blocks, host buffers, disk store, and the weight slots.

- ``resident``: the block's tensors live in compute-device memory for the whole run.
- ``host``: the block is packed once into one flat host buffer; a LoadWeight task copies it into a
  weight slot with one copy. All host buffers (and the disk staging buffers) are views of one
  :class:`~pipo.runtime.memory.HostArena`, page-locked as a whole on CUDA: pinned bytes equal the
  data, not the power-of-two sizes torch's pinned allocator would round each buffer up to.
- ``disk``: the block stays in the offload store; a LoadWeight task on the disk lane reads it with
  aiofiles straight into a 4 KiB-aligned slot buffer. It is never held whole in RAM.
Compute asks :meth:`PlacedWeights.block` for a block's tensors: resident ones, or views of its slot.
With int4 weights on a GPU, placement also compiles the int4 kernels, and :meth:`PlacedWeights.block`
makes this engine's :class:`~pipo.ops.int4_dispatch.Int4Workspace` current for the compute.
:meth:`PlacedWeights.close` releases all of it.
"""

from __future__ import annotations

import torch

from pipo.engine.blocks import BlockLayout, pack, rebase, views
from pipo.io.aligned import ALIGN_NBYTES as DISK_ALIGN_NBYTES
from pipo.io.aligned import aligned_empty
from pipo.io.q8 import Q8Tensor, to_dense
from pipo.ops import int4_dispatch, int4pack
from pipo.ops.layers import fuse_projections
from pipo.ops.quant import QuantTensor, quantize
from pipo.plan import DISK, HOST, RESIDENT, Plan, estimate_block_nbytes
from pipo.runtime import memory
from pipo.runtime.memory import HostArena, PinRegistrar

QUANTIZABLE = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
Q8_KEPT = ("tok", "w_out")  # Q8_0 embedding and head stay 8-bit on the CPU 4-bit path
FP32_KEPT = ("norm_w", "norm_b")
# Streamed block reads: 1 MiB pieces, 8 in flight. Reading a store's blocks in order this way ran at
# 1.48-1.52 GB/s against 1.22 for the store's default 8 MiB x 4 (int4 store, blocks of 0.7-1.6 MB; raw
# O_DIRECT 1.35-1.69) and 2.00 against 1.79 on an fp32 store (RESULTS.md, issue 14).
DISK_CHUNK_NBYTES, DISK_DEPTH = 1 << 20, 8  # the CPU 4-bit path normalizes the fp32 residual stream in fp32


def prepare_block(tensors: dict, dtype: torch.dtype, int4_group: int | None,
                  cpu_packed: bool = False) -> dict:
    """A block as computed on: with ``int4_group``, int4 weights stay int4 (GGUF Q4_0/Q4_1 blocks as
    they are; never re-quantized) and the dense linear weights are quantized to ``int4_group``; without
    it, int4 weights are dequantized to ``dtype`` (dense compute). Then :func:`_converted`, and the q/k/v
    and gate/up matrices fused (see ``pipo.ops.layers.fuse_projections``).

    ``cpu_packed`` (int4 on a CPU): every int4 matrix is repacked once here into torch's CPU int4
    layout (:mod:`pipo.ops.int4pack`), a Q8_0 head too (two exact 4-bit halves), a Q8_0 embedding
    stays Q8 (row lookup); norm weights stay fp32, so the residual stream between blocks stays fp32.
    Otherwise embeddings and the LM head are dense.
    """
    block = fuse_projections(_converted(tensors, dtype, int4_group, cpu_packed))  # int4 parts fuse cheaply
    if cpu_packed:
        return {k: _packed(k, v) for k, v in block.items()}
    if not int4_group:  # dequantize the fused matrices (no dense concatenation), fuse what is left
        block = fuse_projections({k: to_dense(v, dtype) if isinstance(v, QuantTensor) else v
                                  for k, v in block.items()})
    return block


def _packed(name: str, value):
    """An int4 matrix, or a Q8 head, in torch's CPU int4 layout; anything else (a Q8 embedding
    table included) unchanged."""
    if isinstance(value, QuantTensor):
        return int4pack.pack_quant(value)
    if isinstance(value, Q8Tensor) and name == "w_out":
        return int4pack.pack_q8(value)
    return value


def _converted(tensors: dict, dtype: torch.dtype, int4_group: int | None,
               cpu_packed: bool = False) -> dict:
    """``tensors`` cast (and maybe quantized) without fusing: disk blocks stay views of a slot.

    int4 records stay as they are; Q8_0 records (kept GGUF embeddings and heads) are dequantized to
    ``dtype``, or quantized to int4 with ``int4_group`` where they are linear weights. With
    ``cpu_packed`` a Q8_0 embedding or head stays Q8 and norm weights stay fp32.
    """
    out = {}
    for name, value in tensors.items():
        if isinstance(value, Q8Tensor):
            if cpu_packed and name in Q8_KEPT:
                out[name] = value
                continue
            value = to_dense(value)
        if not isinstance(value, torch.Tensor):
            out[name] = value
        elif int4_group and name in QUANTIZABLE:
            out[name] = quantize(value.float(), group_size=int4_group)
        elif cpu_packed and name in FP32_KEPT:
            out[name] = value.float()
        else:
            out[name] = value.to(dtype) if value.is_floating_point() else value
    return out


def cpu_packs(device: torch.device, dtype: torch.dtype, int4_group: int | None) -> bool:
    """Whether int4 weights go into torch's CPU int4 layout (the CPU 4-bit path): torch's kernel
    computes in bf16, so int4 with fp32 compute keeps the exact numba path."""
    return bool(int4_group) and device.type == "cpu" and dtype == torch.bfloat16


def kept_q8(source) -> frozenset[str]:
    """The names among :data:`Q8_KEPT` that ``source`` returns as Q8_0 records."""
    return frozenset(getattr(source, "kept_q8_names", ()))


def embed_by_rows(source) -> bool:
    """Whether a disk-tier embedding of ``source`` is read by rows (a store's table alone in its
    block, :meth:`PlacedWeights._row_tables`): its load task then moves no bytes."""
    return hasattr(source, "table_rows") and source.table_rows("embed", "tok") is not None


def placed_sizes(source, device: torch.device, dtype: torch.dtype, int4_group: int | None
                 ) -> dict[str, int]:
    """:func:`~pipo.plan.estimate_block_nbytes` of the blocks :class:`PlacedWeights` places for
    ``source`` with these options (a kept Q8_0 embedding and head counted as kept)."""
    packed = cpu_packs(device, dtype, int4_group)
    return estimate_block_nbytes(source.spec, dtype.itemsize, int4_group, cpu_packed=packed,
                                 q8=kept_q8(source) if packed else frozenset())


class PlacedWeights:
    """Owns every weight tensor of a run and the slot buffers streamed blocks pass through.

    ``registrar`` page-locks the host arena (default: :func:`~pipo.runtime.memory.default_registrar`
    of ``device``, i.e. cudaHostRegister on CUDA and nothing on the CPU).
    """

    def __init__(self, source, plan: Plan, *, device: torch.device, dtype: torch.dtype,
                 int4_group: int | None = None, registrar: PinRegistrar | None = None):
        self.source, self.plan, self.device, self.dtype = source, plan, device, dtype
        self.int4_group = int4_group
        self.cpu_packed = cpu_packs(device, dtype, int4_group)
        self.resident: dict[str, dict] = {}
        self.host: dict[str, tuple[torch.Tensor, BlockLayout]] = {}
        self.layouts: dict[str, BlockLayout] = {}
        self.row_tables = self._row_tables()
        self.arena = HostArena(self._host_reserve_nbytes(),
                               registrar if registrar is not None else memory.default_registrar(device),
                               name="weights")
        self.holds_int4 = False
        self.int4_workspace: int4_dispatch.Int4Workspace | None = None  # CUDA only
        for block, tier in plan.placement:
            self._place(block, tier)
        if not self.holds_int4 and self._has_disk() and (int4_group or store_is_int4(source)):
            self._use_int4()
        self.slots = [self._slot_buffer(n) for n in plan.slot_sizes(self._slot_block_nbytes())]
        self.slot_views: list[dict] = [{} for _ in self.slots]
        self.slot_holds: list[str | None] = [None] * len(self.slots)
        self.staging = [self.arena.take(n, DISK_ALIGN_NBYTES) for n in self._staging_sizes()]
        self.staging_views: list[dict] = [{} for _ in self.staging]
        self.staging_holds: list[str | None] = [None] * len(self.staging)
        self.arena.pin()

    def _host_reserve_nbytes(self) -> int:
        """Upper bound of the host arena: the host blocks' estimated sizes, per-tensor alignment
        slack and the staging buffers (reserved address space only; an overrun maps more)."""
        sizes = placed_sizes(self.source, self.device, self.dtype, self.int4_group)
        host = [b for b, tier in self.plan.placement if tier == HOST]
        nbytes = sum(sizes[b] + (64 << 10) for b in host)
        return nbytes + sum(n + DISK_ALIGN_NBYTES for n in self._staging_sizes())

    def _disk_block_nbytes(self) -> dict[str, int]:
        """Bytes each disk block takes in a buffer: its stored blob (nothing for a table read by
        rows); other blocks 0."""
        return {b: self.source.block_nbytes(b) if tier == DISK and b not in self.row_tables else 0
                for b, tier in self.plan.placement}

    def _staging_sizes(self) -> list[int]:
        """Bytes of each disk staging buffer (one per weight slot when disk reads are staged)."""
        if not (self.plan.staged_disk and self._has_disk()):
            return []
        return self.plan.slot_sizes(self._disk_block_nbytes())

    def _slot_block_nbytes(self) -> dict[str, int]:
        """Bytes each block takes in its weight slot: a host block's packed layout, a disk block's
        blob (:meth:`_disk_block_nbytes`)."""
        return {**self._disk_block_nbytes(), **{b: v.nbytes for b, v in self.layouts.items()}}

    def _row_tables(self) -> dict[str, dict]:
        """Disk-tier embedding blocks read by rows instead of whole (a store's Q8_0 or dense table
        alone in its block): ``{block: {"tok": StoredRows}}``. Their load tasks read nothing; the
        embedding compute reads its tokens' rows (a few KB a step instead of a 30-113 MB table).
        The rows come in the dtype the table would be computed on: Q8_0 rows stay fp32 on the CPU
        4-bit path (as its kept Q8 table gives them), everything else is cast to ``dtype``."""
        if not hasattr(self.source, "table_rows"):
            return {}
        tables = {}
        for block, tier in self.plan.placement:
            rows = self.source.table_rows(block, "tok") if tier == DISK and block == "embed" else None
            if rows is not None:
                keeps_q8 = self.cpu_packed and rows.group_size is not None
                rows.out_dtype = None if keeps_q8 else self.dtype
                tables[block] = {"tok": rows}
        return tables

    def _place(self, block: str, tier: str) -> None:
        if tier == DISK:
            return  # read per step by load_from_disk
        tensors = prepare_block(self.source.read_block(block), self.dtype, self.int4_group,
                                self.cpu_packed)
        if not self.holds_int4 and any(not isinstance(v, torch.Tensor) for v in tensors.values()):
            self._use_int4()
        if tier == RESIDENT:
            self.resident[block] = {k: v.to(self.device) for k, v in tensors.items()}
            self._share_tied_embedding(block)
        else:
            buffer, layout = pack(tensors, self.arena.take)
            self.host[block], self.layouts[block] = (buffer, layout), layout

    def _use_int4(self) -> None:
        """Int4 weights take part: compile their kernels now (not in the first compute task) and,
        on CUDA, keep one workspace for this engine's int4 launches."""
        self.holds_int4 = True
        int4_dispatch.prepare_kernels(self.device, self.dtype)
        if self.device.type == "cuda":
            self.int4_workspace = int4_dispatch.Int4Workspace()

    def _has_disk(self) -> bool:
        return any(tier == DISK for _, tier in self.plan.placement)

    def _share_tied_embedding(self, block: str) -> None:
        """With tied embeddings and both ends resident, keep one copy of the matrix, not two."""
        if not self.source.spec.tie_embeddings or not {"embed", "head"} <= self.resident.keys():
            return
        tok, out = self.resident["embed"]["tok"], self.resident["head"]["w_out"]
        if isinstance(out, torch.Tensor) and torch.equal(tok, out):
            self.resident["head"]["w_out"] = tok

    def _slot_buffer(self, nbytes: int) -> torch.Tensor:
        """One weight slot of ``nbytes`` (its largest block: :meth:`Plan.slot_sizes`)."""
        if self._has_disk() and not self.plan.staged_disk:  # the disk lane reads into the slot
            return aligned_empty(max(nbytes, DISK_ALIGN_NBYTES))
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def block(self, block: str, slot: int | None) -> dict:
        """The tensors Compute uses for ``block``: resident, or the views of ``slot``. With int4
        weights, this engine's int4 workspace becomes current for the compute that follows."""
        if slot is None:
            tensors = self.resident[block]
        elif self.slot_holds[slot] != block:
            raise RuntimeError(f"weight slot {slot} holds {self.slot_holds[slot]}, not {block}: "
                               "the step graph lacks an ordering edge")
        else:
            tensors = self.slot_views[slot]
        if self.int4_workspace is not None:
            self.int4_workspace.begin_block(tensors)
        return tensors

    def load(self, block: str, slot: int) -> None:
        """Copy host (or staged disk) block ``block`` into weight ``slot`` (one copy)."""
        if block not in self.host:
            return self._load_staged(block, slot)
        buffer, layout = self.host[block]
        target = self.slots[slot][:layout.nbytes]
        target.copy_(buffer, non_blocking=True)
        self._fill(slot, block, views(target, layout))

    async def read_staged(self, block: str, staging: int) -> None:
        """Read ``block`` from the offload store into host staging buffer ``staging`` (a table read
        by rows: nothing)."""
        self.staging_holds[staging] = None
        if block not in self.row_tables:
            self.staging_views[staging] = await self.source.read_block_into(
                block, self.staging[staging], chunk_nbytes=DISK_CHUNK_NBYTES, depth=DISK_DEPTH)
        self.staging_holds[staging] = block

    def _load_staged(self, block: str, slot: int) -> None:
        staging = self.staging_holds.index(block)  # ValueError here means a missing graph edge
        if block in self.row_tables:
            return self._fill(slot, block, self.row_tables[block])
        source = self.staging[staging]
        nbytes = self.source.block_nbytes(block)
        target = self.slots[slot][:nbytes]
        target.copy_(source[:nbytes], non_blocking=True)
        tensors = rebase(self.staging_views[staging], source, target)
        self._fill(slot, block, self._streamed(tensors))

    async def load_from_disk(self, block: str, slot: int) -> None:
        """Read ``block`` from the offload store straight into weight ``slot`` (a table read by
        rows: nothing; its rows are read when the embedding is computed)."""
        if block in self.row_tables:
            return self._fill(slot, block, self.row_tables[block])
        tensors = await self.source.read_block_into(block, self.slots[slot], chunk_nbytes=DISK_CHUNK_NBYTES,
                                                    depth=DISK_DEPTH)
        self._fill(slot, block, self._streamed(tensors))

    def _streamed(self, tensors: dict) -> dict:
        """A block read from the store as computed on: cast; int4 and Q8_0 records stay views of the
        slot as stored. On the CPU 4-bit path they are multiplied by numba kernels that read that
        layout (:class:`~pipo.ops.int4pack.StoredInt4`, ``pipo.io.q8.q8_linear``): repacking them for
        torch's int4 kernel on every load costs more than the disk read (RESULTS.md, issue 14)."""
        converted = _converted(tensors, self.dtype, None, self.cpu_packed)
        if not self.cpu_packed:
            return converted
        return {k: int4pack.stored_int4(v) if isinstance(v, QuantTensor) else v
                for k, v in converted.items()}

    def _fill(self, slot: int, block: str, tensors: dict) -> None:
        self.slot_views[slot], self.slot_holds[slot] = tensors, block

    @property
    def pinned_nbytes(self) -> int:
        """Page-locked host bytes (the arena's registered ranges)."""
        return self.arena.pinned_nbytes

    def close(self) -> None:
        """Unpin and drop the host arena, the slots and the int4 workspace."""
        if self.int4_workspace is not None:
            self.int4_workspace.close()
        self.resident, self.host, self.slot_views, self.staging_views = {}, {}, [], []
        self.slots, self.staging = [], []
        self.arena.close()


def store_is_int4(source) -> bool:
    """Whether ``source`` is an offload store holding 4-bit linear weights."""
    return getattr(source, "int4_group_size", None) is not None
