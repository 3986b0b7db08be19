"""Task kinds: frozen records of *what* to do, never the tensors to do it with.

A task holds keys (block name, micro-batch, slot) and the name of the lane it runs on. The tensors
live in the run context that an executor receives; that is why a step graph can be built, checked,
rendered and golden-tested without torch, and reused for every generated token.

Four kinds ship with pipo (the paper's four concurrent activities), plus ReadBlock for the
disk -> pinned staging hop. Register a new kind by writing a
frozen dataclass that subclasses :class:`Task` and an executor for it (see ``pipo.runtime.registry``
and ``docs/extending.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pipo.io.spec import block_layer, block_part

COMPUTE = "compute"
LOAD_WEIGHT = "load_weight"
LOAD_KV = "load_kv"
SAVE_KV = "save_kv"
DISK = "disk"
LANES = (COMPUTE, LOAD_WEIGHT, LOAD_KV, SAVE_KV, DISK)


@dataclass(frozen=True, slots=True)
class Task:
    """Base of every task kind: subclasses add key fields and choose a default lane."""

    lane: str = field(default=COMPUTE, kw_only=True)

    @property
    def kind(self) -> str:
        """The task kind: its class name."""
        return type(self).__name__

    @property
    def keys(self) -> tuple:
        """The key fields (everything but the lane), in declaration order."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "lane")

    @property
    def name(self) -> str:
        """Unique, readable node name, e.g. ``LoadWeight(L3.attn,1)``."""
        return f"{self.kind}({','.join('-' if k is None else str(k) for k in self.keys)})"

    def label(self) -> str:
        """What the task does, in a few words, for pictures (default: its name); kinds override
        it, e.g. ``load L3.attn → slot 1``."""
        return self.name

    @property
    def model_layer(self) -> int | None:
        """The model layer the task works on, so that pictures of deep models can leave layers
        out (default: ``None``, no layer)."""
        return None


@dataclass(frozen=True, slots=True)
class Compute(Task):
    """Run one block (embed, attention, MLP, head) for one micro-batch.

    ``slot`` is the weight slot the block was loaded into (``None``: the block is resident);
    ``kv_slot`` is the KV staging slot for attention with an offloaded cache (``None``: resident KV).
    """

    block: str
    micro: int = 0
    slot: int | None = None
    kv_slot: int | None = None

    def label(self) -> str:
        """``attn L3 · m0``: the block's part and layer, and the micro-batch."""
        layer = block_layer(self.block)
        part = block_part(self.block)
        return f"{part if layer is None else f'{part} L{layer}'} · m{self.micro}"

    @property
    def model_layer(self) -> int | None:
        """The block's layer (``None`` for embed and head)."""
        return block_layer(self.block)


@dataclass(frozen=True, slots=True)
class LoadWeight(Task):
    """Copy one block's weights from host memory (or disk) into a weight slot (``slot``)."""

    block: str
    slot: int
    lane: str = field(default=LOAD_WEIGHT, kw_only=True)

    def label(self) -> str:
        """``load L3.attn → slot 1``."""
        return f"load {self.block} → slot {self.slot}"

    @property
    def model_layer(self) -> int | None:
        """The block's layer (``None`` for embed and head)."""
        return block_layer(self.block)


@dataclass(frozen=True, slots=True)
class ReadBlock(Task):
    """Read one block from the offload store into a host staging buffer (``staging``).

    Used where disk reads must land in pinned memory before a LoadWeight copies them to the device;
    the staging buffer is refilled only after that copy finished (a slot-reuse edge).
    """

    block: str
    staging: int
    lane: str = field(default=DISK, kw_only=True)

    def label(self) -> str:
        """``read L3.attn → staging 0``."""
        return f"read {self.block} → staging {self.staging}"

    @property
    def model_layer(self) -> int | None:
        """The block's layer (``None`` for embed and head)."""
        return block_layer(self.block)


@dataclass(frozen=True, slots=True)
class LoadKV(Task):
    """Copy the KV cache of one layer and micro-batch from host memory into a KV slot."""

    layer: int
    micro: int
    slot: int
    lane: str = field(default=LOAD_KV, kw_only=True)

    def label(self) -> str:
        """``load KV L3 m1 → slot 0``."""
        return f"load KV L{self.layer} m{self.micro} → slot {self.slot}"

    @property
    def model_layer(self) -> int:
        """The layer whose cache this is."""
        return self.layer


@dataclass(frozen=True, slots=True)
class SaveKV(Task):
    """Copy the KV entries one layer and micro-batch wrote this step from a KV slot to the host."""

    layer: int
    micro: int
    slot: int
    lane: str = field(default=SAVE_KV, kw_only=True)

    def label(self) -> str:
        """``save KV L3 m1 from slot 0``."""
        return f"save KV L{self.layer} m{self.micro} from slot {self.slot}"

    @property
    def model_layer(self) -> int:
        """The layer whose cache this is."""
        return self.layer
