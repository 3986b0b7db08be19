"""What every schedule shares: the tasks a block needs, their slots and their accesses.

:class:`StepEmitter` owns all index arithmetic (which weight slot a streamed block uses, which KV slot
a (layer, micro-batch) pair uses, which block's output a compute reads). A schedule only decides the
order in which it asks for tasks and which extra ordering edges it adds. Slots are assigned round
robin in program order; the dataflow edges derived from the accesses make a slot's next fill wait for
its last reader, so the number of slots bounds the look-ahead.
"""

from __future__ import annotations

from typing import Iterable

import networkx as nx

from pipo.io.spec import ModelSpec, block_layer, block_part
from pipo.plan import DISK, RESIDENT, Plan
from pipo.runtime.graph import GraphBuilder
from pipo.runtime.tasks import DISK as DISK_LANE
from pipo.runtime.tasks import Compute, LoadKV, LoadWeight, ReadBlock, SaveKV

PREFILL, DECODE = "prefill", "decode"


def kv_content(layer: int, micro: int) -> str:
    """What a KV slot holds: the cache of one layer for one micro-batch."""
    return f"L{layer}/m{micro}"


class StepEmitter:
    """Adds the tasks of one step (prefill or decode) to a graph, with slots and accesses."""

    def __init__(self, spec: ModelSpec, plan: Plan, phase: str):
        if phase not in (PREFILL, DECODE):
            raise ValueError(f"phase must be {PREFILL!r} or {DECODE!r}, got {phase!r}")
        self.spec, self.plan, self.phase = spec, plan, phase
        self.builder = GraphBuilder()
        self.blocks = spec.block_names()
        self.weight_slot = plan.weight_slots()
        pairs = [(layer, m) for layer in range(spec.n_layers) for m in range(plan.n_micro)]
        self.kv_slot = {p: i % plan.n_kv_slots for i, p in enumerate(pairs)}

    @property
    def graph(self) -> nx.DiGraph:
        """The graph built so far."""
        return self.builder.graph

    def load_weight(self, block: str, after: Iterable[str] = ()) -> str | None:
        """LoadWeight for a streamed block (``None`` for a resident one).

        A staged disk block gets a ReadBlock into staging buffer ``slot`` first; staging buffers
        pair with weight slots, so the slot count bounds the disk look-ahead too.
        """
        if self.plan.where(block) == RESIDENT:
            return None
        slot = self.weight_slot[block]
        if self.plan.where(block) != DISK:
            return self.builder.add(LoadWeight(block, slot), writes=[("w", slot, block)],
                                    after=after)
        if not self.plan.staged_disk:
            return self.builder.add(LoadWeight(block, slot, lane=DISK_LANE),
                                    writes=[("w", slot, block)], after=after)
        read = self.builder.add(ReadBlock(block, slot), writes=[("stage", slot, block)],
                                after=after)
        return self.builder.add(LoadWeight(block, slot), reads=[("stage", slot, block)],
                                writes=[("w", slot, block)], after=[read])

    def compute(self, block: str, micro: int, after: Iterable[str] = ()) -> str:
        """Compute of ``block`` for micro-batch ``micro``."""
        slot = self.weight_slot.get(block)
        kv_slot = self._kv_slot_of(block, micro)
        reads, writes = [], [("act", micro, block)]
        index = self.blocks.index(block)
        if index > 0:
            reads.append(("act", micro, self.blocks[index - 1]))
        if slot is not None:
            reads.append(("w", slot, block))
        if kv_slot is not None:
            content = kv_content(block_layer(block), micro)
            writes.append(("kv", kv_slot, content))
            if self.phase == DECODE:
                reads.append(("kv", kv_slot, content))
        task = Compute(block, micro, slot, kv_slot)
        return self.builder.add(task, reads=reads, writes=writes, after=after)

    def load_kv(self, layer: int, micro: int, after: Iterable[str] = ()) -> str | None:
        """LoadKV for an offloaded cache in a decode step (``None`` otherwise)."""
        if not self.plan.kv_offloaded or self.phase == PREFILL:
            return None
        slot = self.kv_slot[(layer, micro)]
        return self.builder.add(LoadKV(layer, micro, slot),
                                writes=[("kv", slot, kv_content(layer, micro))], after=after)

    def save_kv(self, layer: int, micro: int, after: Iterable[str] = ()) -> str | None:
        """SaveKV for an offloaded cache (``None`` when the cache is resident)."""
        if not self.plan.kv_offloaded:
            return None
        slot = self.kv_slot[(layer, micro)]
        return self.builder.add(SaveKV(layer, micro, slot),
                                reads=[("kv", slot, kv_content(layer, micro))], after=after)

    def _kv_slot_of(self, block: str, micro: int) -> int | None:
        if not self.plan.kv_offloaded or block_part(block) != "attn":
            return None
        return self.kv_slot[(block_layer(block), micro)]


def attn_layer(block: str) -> int | None:
    """Layer of an attention block, ``None`` for any other block."""
    return block_layer(block) if block_part(block) == "attn" else None
