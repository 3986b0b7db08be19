"""The Plan: every setting of a run in one frozen record, made by a pure planner.

Where each weight block lives (``resident`` in compute-device memory, ``host`` RAM streamed through
weight slots, or ``disk`` streamed from an offload store), where the KV cache lives, how the batch is
split into micro-batches, how many weight / KV slots exist (look-ahead = weight slots - 1), and which
schedule builds the step graphs. No torch here: plans and graphs are built and tested without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from pipo.errors import DeviceMemoryTooSmall, PlanError
from pipo.io.spec import ModelSpec

RESIDENT, HOST, DISK = "resident", "host", "disk"
PLACEMENTS = (RESIDENT, HOST, DISK)
SCHEDULE_NAMES = ("sequential", "flexgen", "pipo")
ACTIVATION_RESERVE_FRACTION = 0.10
PACK_ROW_MULTIPLE = 16  # rows of torch's CPU int4 layout (pipo.ops.int4pack.N_MULTIPLE)
Q8_NBYTES_PER_32 = 34  # a GGUF Q8_0 block: fp16 scale + 32 int8 codes (pipo.io.q8)


@dataclass(frozen=True, slots=True)
class Plan:
    """All settings of one run. ``placement`` pairs each block with its tier, in block order.

    ``staged_disk``: disk blocks are read into host staging buffers (pinned on CUDA) by ReadBlock
    tasks and then copied into weight slots; otherwise they are read straight into the slots.
    ``kv_disk``: an offloaded KV cache lives in a memory-mapped scratch file rather than RAM.
    """

    placement: tuple[tuple[str, str], ...]
    batch: int
    micro_batch: int
    max_len: int
    kv_offloaded: bool = False
    n_weight_slots: int = 2
    n_kv_slots: int = 2
    schedule: str = "pipo"
    slot_nbytes: int = 0
    kv_nbytes: int = 0
    resident_nbytes: int = 0
    staged_disk: bool = False
    kv_disk: bool = False

    @property
    def n_micro(self) -> int:
        """Number of micro-batches."""
        return -(-self.batch // self.micro_batch)

    def where(self, block: str) -> str:
        """Tier of ``block``."""
        return dict(self.placement)[block]

    def streamed(self) -> list[str]:
        """Blocks that a LoadWeight task brings in every step, in block order."""
        return [b for b, tier in self.placement if tier != RESIDENT]

    def weight_slots(self) -> dict[str, int]:
        """The weight slot of each streamed block: round robin in block order (every schedule's
        graphs and the engine's slot buffers follow this one assignment)."""
        return {b: i % self.n_weight_slots for i, b in enumerate(self.streamed())}

    def slot_sizes(self, block_nbytes: Mapping[str, int]) -> list[int]:
        """Bytes of each weight slot: the largest block it ever holds (``block_nbytes``: bytes a
        block takes in a slot; 0 for one that needs none, like an embedding read by rows). A slot
        that holds only layer blocks is not sized by the embedding or head."""
        sizes = [0] * (self.n_weight_slots if self.streamed() else 0)
        for block, slot in self.weight_slots().items():
            sizes[slot] = max(sizes[slot], block_nbytes[block])
        return sizes


def kv_cache_nbytes(spec: ModelSpec, batch: int, max_len: int, dtype_nbytes: int) -> int:
    """Bytes of a full K and V cache for ``batch`` sequences of ``max_len`` tokens."""
    return 2 * spec.n_layers * batch * spec.n_kv_heads * max_len * spec.head_dim * dtype_nbytes


def make_plan(spec: ModelSpec, block_nbytes: Mapping[str, int], *, batch: int, max_len: int,
              micro_batch: int | None = None, device_memory: int | None = None,
              offload_tier: str = HOST, kv_offload: bool = False, n_weight_slots: int = 2,
              n_kv_slots: int = 2, kv_dtype_nbytes: int = 4, schedule: str = "pipo") -> Plan:
    """Place blocks under ``device_memory`` bytes (``None``: everything resident).

    Keeps the largest blocks resident first (each resident byte is a byte not moved per step) while
    the rest still fit through ``n_weight_slots`` slots next to the KV cache (when resident) and an
    activation reserve. Each slot is counted at the largest streamed block; the engine sizes a slot
    by the blocks it takes (:meth:`Plan.slot_sizes`), so it holds at most that. Raises :class:`~pipo.errors.DeviceMemoryTooSmall` (a :class:`PlanError`)
    naming :func:`minimum_device_memory` when not even one slot and the KV cache fit.
    """
    args = dict(batch=batch, max_len=max_len, micro_batch=micro_batch, offload_tier=offload_tier,
                kv_offload=kv_offload, n_weight_slots=n_weight_slots, n_kv_slots=n_kv_slots,
                kv_dtype_nbytes=kv_dtype_nbytes, schedule=schedule)
    plan = plan_within(spec, block_nbytes, device_memory, **args)
    if plan is None:
        raise _too_small(spec, block_nbytes, device_memory, args)
    return plan


def plan_within(spec: ModelSpec, block_nbytes: Mapping[str, int], device_memory: int | None, *,
                batch: int, max_len: int, micro_batch: int | None = None,
                offload_tier: str = HOST, kv_offload: bool = False, n_weight_slots: int = 2,
                n_kv_slots: int = 2, kv_dtype_nbytes: int = 4, schedule: str = "pipo"
                ) -> Plan | None:
    """The planner behind :func:`make_plan`: its plan, or ``None`` when ``device_memory`` is too
    small (bad shape or schedule arguments still raise :class:`PlanError`)."""
    micro_batch = micro_batch or batch
    _check_shape_args(batch, micro_batch, max_len, n_weight_slots, n_kv_slots)
    schedule = _checked_schedule(schedule)
    kv_full = kv_cache_nbytes(spec, batch, max_len, kv_dtype_nbytes)
    kv_layer = kv_full // spec.n_layers // -(-batch // micro_batch)
    kv_on_device = kv_layer * n_kv_slots if kv_offload else kv_full
    blocks = spec.block_names()
    if device_memory is None:
        return fixed_plan(spec, block_nbytes, RESIDENT, batch=batch, max_len=max_len,
                          micro_batch=micro_batch, kv_offload=kv_offload,
                          n_weight_slots=n_weight_slots, n_kv_slots=n_kv_slots,
                          kv_dtype_nbytes=kv_dtype_nbytes, schedule=schedule)
    budget = int(device_memory * (1 - ACTIVATION_RESERVE_FRACTION)) - kv_on_device
    tiers, slot_nbytes, resident = _place(blocks, block_nbytes, budget, n_weight_slots, offload_tier)
    if tiers is None:
        return None
    return Plan(tuple((b, tiers[b]) for b in blocks), batch, micro_batch, max_len, kv_offload,
                n_weight_slots, n_kv_slots, schedule, slot_nbytes, kv_full, resident)


def minimum_device_memory(spec: ModelSpec, block_nbytes: Mapping[str, int], **plan_args) -> int:
    """The smallest ``device_memory`` (bytes) for which :func:`make_plan` with ``plan_args`` (its
    other keyword arguments) succeeds.

    Defined by the planner itself: a bisection over :func:`plan_within`, so it stays exact whatever
    the planner does, provided a larger budget never fails where a smaller one plans.
    """
    def plans(nbytes: int) -> bool:
        return plan_within(spec, block_nbytes, nbytes, **plan_args) is not None

    fails, works = -1, max(1, sum(block_nbytes.values()))  # a budget of -1 byte never plans
    while not plans(works):
        if works > 2**60:
            raise PlanError("no device memory budget, however large, plans this run")
        fails, works = works, works * 2
    while works - fails > 1:
        middle = (fails + works) // 2
        fails, works = (fails, middle) if plans(middle) else (middle, works)
    return works


def _too_small(spec: ModelSpec, block_nbytes: Mapping[str, int], device_memory: int,
               args: dict) -> DeviceMemoryTooSmall:
    """The refusal of ``device_memory``, with the exact minimum (and the one with KV offload, when
    offloading was not asked for and would lower it)."""
    minimum = minimum_device_memory(spec, block_nbytes, **args)
    offloaded = None
    if not args["kv_offload"]:
        offloaded = minimum_device_memory(spec, block_nbytes, **{**args, "kv_offload": True})
        offloaded = offloaded if offloaded < minimum else None
    return DeviceMemoryTooSmall(device_memory, minimum, offloaded)


def fixed_plan(spec: ModelSpec, block_nbytes: Mapping[str, int], tier: str, *, batch: int,
               max_len: int, micro_batch: int | None = None, kv_offload: bool = False,
               n_weight_slots: int = 2, n_kv_slots: int = 2, kv_dtype_nbytes: int = 4,
               schedule: str = "pipo") -> Plan:
    """Every block in ``tier`` (like FlexGen's fixed ``--percent``), for tests and benchmarks."""
    if tier not in PLACEMENTS:
        raise PlanError(f"unknown placement {tier!r}; choose one of {', '.join(PLACEMENTS)}")
    micro_batch = micro_batch or batch
    _check_shape_args(batch, micro_batch, max_len, n_weight_slots, n_kv_slots)
    blocks = spec.block_names()
    streamed = tier != RESIDENT
    return Plan(tuple((b, tier) for b in blocks), batch, micro_batch, max_len, kv_offload,
                n_weight_slots, n_kv_slots, _checked_schedule(schedule),
                max(block_nbytes[b] for b in blocks) if streamed else 0,
                kv_cache_nbytes(spec, batch, max_len, kv_dtype_nbytes),
                0 if streamed else sum(block_nbytes[b] for b in blocks))


def _place(blocks, block_nbytes, budget, n_slots, offload_tier):
    """Fewest streamed bytes under ``budget``: returns (tiers, slot_nbytes, resident_nbytes).

    For each candidate slot size, blocks larger than a slot must be resident; the rest of the
    budget takes the largest remaining blocks that still fit. The best candidate wins.
    """
    total = sum(block_nbytes[b] for b in blocks)
    if total <= budget:
        return {b: RESIDENT for b in blocks}, 0, total
    # largest first, equal sizes in block order (never set order: string hashes vary per process)
    by_size = sorted(blocks, key=lambda b: -block_nbytes[b])
    best = None
    for slot in sorted({block_nbytes[b] for b in blocks}, reverse=True):
        resident = {b for b in blocks if block_nbytes[b] > slot}
        left = budget - n_slots * slot - sum(block_nbytes[b] for b in resident)
        if left < 0:
            continue
        for b in (b for b in by_size if b not in resident):
            if block_nbytes[b] <= left:
                resident.add(b)
                left -= block_nbytes[b]
        if len(resident) == len(blocks):
            continue  # everything resident leaves no slot to size: covered by the check above
        kept = sum(block_nbytes[b] for b in resident)
        if best is None or kept > best[2]:
            tiers = {b: RESIDENT if b in resident else offload_tier for b in blocks}
            best = (tiers, slot, kept)
    return best if best is not None else (None, 0, 0)


def _check_shape_args(batch, micro_batch, max_len, n_weight_slots, n_kv_slots) -> None:
    if batch < 1 or micro_batch < 1 or micro_batch > batch:
        raise PlanError(f"need 1 <= micro_batch <= batch, got micro_batch={micro_batch}, "
                        f"batch={batch}")
    if n_weight_slots < 1 or n_kv_slots < 1:
        raise PlanError("need at least one weight slot and one KV slot")
    if max_len < 1:
        raise PlanError(f"max_len must be positive, got {max_len}")


def _checked_schedule(schedule: str) -> str:
    if schedule not in SCHEDULE_NAMES:
        raise PlanError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    return schedule


def estimate_block_nbytes(spec: ModelSpec, dtype_nbytes: int, int4_group: int | None = None, *,
                          cpu_packed: bool = False, q8: frozenset[str] = frozenset()
                          ) -> dict[str, int]:
    """Bytes each block takes in memory as placed (:mod:`pipo.engine.weights`), from the
    architecture alone (no file read).

    With ``int4_group``, the attention and MLP matrices count 4 bits per weight plus an fp16 scale
    and min per group; embeddings, norms, biases and the LM head stay at ``dtype_nbytes``.
    ``cpu_packed`` (the CPU 4-bit path, torch's int4 layout): int4 rows pad to a multiple of 16,
    norms stay fp32, and of ``q8`` (the names among ``tok`` / ``w_out`` the source holds as
    GGUF Q8_0) the embedding stays Q8_0 and the head is packed as two 4-bit halves.
    """
    h, hd = spec.hidden, spec.head_dim
    q_out, kv_out = spec.n_heads * hd, spec.n_kv_heads * hd
    norm = h * (2 if spec.family == "opt" else 1) * (4 if cpu_packed else dtype_nbytes)

    def matrix(out_f: int, in_f: int) -> int:
        if not int4_group:
            return out_f * in_f * dtype_nbytes
        if cpu_packed:
            out_f += -out_f % PACK_ROW_MULTIPLE
        return out_f * in_f // 2 + out_f * -(-in_f // int4_group) * 4

    attn = matrix(q_out, h) + 2 * matrix(kv_out, h) + matrix(h, q_out) + norm
    attn += (q_out + 2 * kv_out + h) * dtype_nbytes if spec.attention_bias else 0
    n_up = 1 if spec.family == "opt" else 2
    mlp = n_up * matrix(spec.ffn, h) + matrix(h, spec.ffn) + norm
    mlp += (spec.ffn + h) * dtype_nbytes if spec.mlp_bias else 0
    table = spec.vocab_size * h
    kept = q8 if cpu_packed else frozenset()
    embed = table * Q8_NBYTES_PER_32 // 32 if "tok" in kept else table * dtype_nbytes
    embed += (spec.max_positions + 2) * h * dtype_nbytes if spec.family == "opt" else 0
    if "w_out" in kept:  # two 4-bit halves along 2*hidden, bf16 scale and zero per 32
        rows = spec.vocab_size + -spec.vocab_size % PACK_ROW_MULTIPLE
        out = rows * h + rows * (2 * h // 32) * 4
    else:
        out = table * dtype_nbytes
    sizes = {"embed": embed, "head": out + norm}
    for layer in range(spec.n_layers):
        sizes[f"L{layer}.attn"], sizes[f"L{layer}.mlp"] = attn, mlp
    return sizes
