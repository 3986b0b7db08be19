"""The planner: search plans under memory caps and keep the one the simulator predicts fastest.

Dimensions: weights dense or int4 (int4 only when allowed), KV on the device / in host RAM / in a
disk file, weight slots 1-4 (look-ahead = slots - 1), KV slots 2-3, micro-batch size (the batch,
halves, quarters, eighths), schedule (pipo, flexgen, sequential). For each combination the block
placement is :func:`pipo.plan.plan_within`'s (the most bytes resident under the device cap), then
streamed blocks go to host RAM while the host cap allows and to the offload store (disk) beyond it.
A candidate that does not fit a cap is dropped; the rest are scored by :func:`estimate` (decode
and prefill step graphs replayed on the virtual clock, :mod:`pipo.runtime.simulate`).

Search: a small grid over (KV placement, weight slots, int4) at the whole batch (if nothing of it
fits: the first feasible points of the full grid), then coordinate passes over
micro-batch, weight slots, KV slots and schedule, each keeping the best so far; every evaluation
is cached. Candidates are visited in a fixed order and ties keep the earlier one, so the same
inputs always give the same plan. Pinned choices (:class:`Pins`, the user's manual options) are
never varied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipo.errors import DeviceMemoryTooSmall, PlanError
from pipo.io.spec import ModelSpec
from pipo.plan import (
    ACTIVATION_RESERVE_FRACTION,
    DISK,
    HOST,
    RESIDENT,
    Plan,
    fixed_plan,
    kv_cache_nbytes,
    plan_within,
)
from pipo.planner.estimate import Estimate, estimate
from pipo.planner.profile import Profile

KV_DEVICE, KV_HOST, KV_DISK = "device", "host", "disk"
KV_PLACES = (KV_DEVICE, KV_HOST, KV_DISK)
SLOT_CHOICES = (1, 2, 3, 4)
KV_SLOT_CHOICES = (2, 3)
SCHEDULES = ("pipo", "flexgen", "sequential")
N_ALTERNATIVES = 3
N_SEEDS = 12


@dataclass(frozen=True)
class Request:
    """What to plan for: the model, the batch, lengths (tokens) and what the machine offers.

    ``dtype_nbytes``: compute dtype size; ``group_size``: int4 group if int4 is chosen;
    ``has_store``: the model is an offload store (a disk tier exists); ``kv_disk_ok``: a disk KV
    file is possible (CPU only); ``device_is_host``: the device is the CPU (its memory counts
    against the host cap too); ``staged_disk``: disk reads pass through host staging buffers;
    ``int4_packed``: int4 weights go into torch's CPU int4 layout (the CPU 4-bit path), keeping the
    ``q8`` embedding / head names as Q8_0 (see :func:`pipo.plan.estimate_block_nbytes`);
    ``embed_rows``: a disk-tier embedding is read by rows (its load moves nothing).
    """

    spec: ModelSpec
    batch: int
    max_len: int
    prompt_len: int
    new_tokens: int
    dtype_nbytes: int = 4
    group_size: int = 64
    has_store: bool = False
    kv_disk_ok: bool = True
    device_is_host: bool = True
    staged_disk: bool = False
    int4_packed: bool = False
    q8: frozenset[str] = frozenset()
    embed_rows: bool = False


@dataclass(frozen=True)
class Caps:
    """Limits: ``device_memory`` / ``host_memory`` in bytes (``None``: none), ``allow_int4``, and
    ``link_bps`` (bytes/s) for every host<->device lane (``None``: the measured speed)."""

    device_memory: int | None = None
    host_memory: int | None = None
    allow_int4: bool = False
    link_bps: float | None = None


@dataclass(frozen=True)
class Pins:
    """Choices the user made by hand; ``None`` lets the planner choose."""

    tier: str | None = None
    kv: str | None = None
    micro_batch: int | None = None
    n_weight_slots: int | None = None
    n_kv_slots: int | None = None
    schedule: str | None = None
    int4: bool | None = None


@dataclass(frozen=True)
class Choice:
    """One evaluated plan: the plan, whether weights are int4, its prediction and memory per tier."""

    plan: Plan
    int4: bool
    estimate: Estimate
    memory: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class PlannerResult:
    """The chosen plan, the next-best distinct alternatives, and how many plans were scored."""

    best: Choice
    alternatives: tuple[Choice, ...]
    evaluated: int


def plan_run(request: Request, caps: Caps, profile: Profile, pins: Pins = Pins()) -> PlannerResult:
    """The best plan for ``request`` under ``caps`` (see the module docstring); :class:`PlanError`
    when no candidate fits."""
    search = _Search(request, caps, profile, pins)
    best = None
    for kv in search.options("kv"):
        for slots in search.options("n_weight_slots", (1, 2, 3)):
            for int4 in search.options("int4"):
                best = search.better(best, {"kv": kv, "n_weight_slots": slots, "int4": int4})
    if best is None:  # only smaller micro-batches or more KV slots fit: start from those
        for point in [p for p in search.grid() if search.fits(p)][:N_SEEDS]:
            best = search.better(best, point)
    if best is None:
        raise _refusal(request, caps, pins)
    for _ in range(2):
        for name in ("micro_batch", "n_weight_slots", "n_kv_slots", "schedule", "kv", "int4"):
            for value in search.options(name):
                best = search.better(best, {**best, name: value})
    return search.result(best)


def _refusal(request: Request, caps: Caps, pins: Pins) -> PlanError:
    """Why nothing fits: the exact smallest device memory that plans (a bisection over the
    candidates' feasibility, no simulation), or the host cap when no device memory would do."""
    def feasible(nbytes: int | None) -> bool:
        search = _Search(request, replace(caps, device_memory=nbytes), None, pins)
        return any(search.fits(point) for point in search.grid())

    if caps.device_memory is None or not feasible(None):
        return PlanError("no plan fits --host-memory: raise it, or use an offload store "
                         "(pipo convert) so that blocks can stay on disk")
    fails, works = caps.device_memory, max(1, 2 * caps.device_memory)
    while not feasible(works):
        fails, works = works, works * 2
    while works - fails > 1:
        middle = (fails + works) // 2
        fails, works = (fails, middle) if feasible(middle) else (middle, works)
    return DeviceMemoryTooSmall(caps.device_memory, works)


class _Search:
    """Candidate construction, feasibility and a cache of scored candidates."""

    def __init__(self, request: Request, caps: Caps, profile: Profile, pins: Pins):
        self.request, self.caps, self.profile, self.pins = request, caps, profile, pins
        self.scored: dict[tuple, Choice | None] = {}

    def options(self, name: str, default: tuple | None = None) -> tuple:
        """The values dimension ``name`` may take (just the pin when pinned)."""
        pinned = getattr(self.pins, name)
        if pinned is not None:
            return (pinned,)
        r = self.request
        if name == "kv":
            return tuple(k for k in KV_PLACES if k != KV_DISK or r.kv_disk_ok)
        if name == "int4":
            return (False, True) if self.caps.allow_int4 else (False,)
        if name == "micro_batch":
            return tuple(sorted({-(-r.batch // d) for d in (1, 2, 4, 8)}, reverse=True))
        if name == "n_kv_slots":
            return KV_SLOT_CHOICES
        if name == "schedule":
            return SCHEDULES
        return default or SLOT_CHOICES

    def grid(self):
        """Every candidate point that can differ in memory (the schedule does not)."""
        for kv in self.options("kv"):
            for slots in self.options("n_weight_slots"):
                for micro in self.options("micro_batch"):
                    for kv_slots in self.options("n_kv_slots"):
                        for int4 in self.options("int4"):
                            yield {"kv": kv, "n_weight_slots": slots, "micro_batch": micro,
                                   "n_kv_slots": kv_slots, "int4": int4}

    def fits(self, point: dict) -> bool:
        """Whether candidate ``point`` fits the caps (no simulation)."""
        return self._plan(self._complete(point)) is not None

    def better(self, best: dict | None, point: dict) -> dict | None:
        """``point`` if it fits and is predicted strictly faster than ``best``, else ``best``."""
        choice = self.choice(point)
        if choice is None:
            return best
        if best is None or _ahead(choice, self.choice(best)):
            return point
        return best

    def choice(self, point: dict) -> Choice | None:
        """The scored candidate at ``point`` (cached); ``None`` when it does not fit the caps."""
        full = self._complete(point)
        key = tuple(sorted(full.items()))
        if key not in self.scored:
            plan = self._plan(full)
            try:
                self.scored[key] = None if plan is None else self._score(plan, full["int4"])
            except PlanError:  # a schedule that cannot run this plan (e.g. flexgen, one slot)
                self.scored[key] = None
        return self.scored[key]

    def _complete(self, point: dict) -> dict:
        p, r = self.pins, self.request
        full = {"kv": p.kv or KV_DEVICE, "micro_batch": p.micro_batch or r.batch,
                    "n_weight_slots": p.n_weight_slots or 2, "schedule": p.schedule or "pipo",
                    "int4": bool(p.int4)}
        full.update(point)
        full.setdefault("n_kv_slots", p.n_kv_slots or (3 if full["schedule"] == "flexgen" else 2))
        return full

    def _sizes(self, int4: bool) -> dict[str, int]:
        from pipo.plan import estimate_block_nbytes

        r = self.request
        packed = int4 and r.int4_packed
        return estimate_block_nbytes(r.spec, r.dtype_nbytes, r.group_size if int4 else None,
                                     cpu_packed=packed, q8=r.q8 if packed else frozenset())

    def _plan(self, c: dict) -> Plan | None:
        """The plan of candidate ``c`` with tiers fitted to both caps, or ``None``."""
        r, sizes = self.request, self._sizes(c["int4"])
        args = {"batch": r.batch, "max_len": r.max_len, "micro_batch": c["micro_batch"],
                    "kv_offload": c["kv"] != KV_DEVICE, "n_weight_slots": c["n_weight_slots"],
                    "n_kv_slots": c["n_kv_slots"], "kv_dtype_nbytes": r.dtype_nbytes,
                    "schedule": c["schedule"]}
        if self.pins.tier is not None:
            plan = fixed_plan(r.spec, sizes, self.pins.tier, **args)
        else:
            plan = plan_within(r.spec, sizes, self.caps.device_memory, offload_tier=HOST, **args)
        if plan is None:
            return None
        plan = replace(plan, kv_disk=c["kv"] == KV_DISK,
                       staged_disk=r.staged_disk and any(t == DISK for _, t in plan.placement))
        plan = self._fit_host(plan, sizes)
        if plan is None or not fits(plan, sizes, r, self.caps):
            return None
        return plan

    def _fit_host(self, plan: Plan, sizes: dict[str, int]) -> Plan | None:
        """Streamed blocks in host RAM while the host cap allows, the rest on disk (a store)."""
        cap, r = self.caps.host_memory, self.request
        if cap is None or self.pins.tier is not None:
            return plan
        fixed = memory_per_tier(plan, sizes, r)[HOST] - sum(
            sizes[b] for b, t in plan.placement if t == HOST)
        room = cap - fixed
        placement = []
        for block, tier in plan.placement:
            if tier == HOST and sizes[block] > room:
                if not r.has_store:
                    return None
                tier = DISK
            elif tier == HOST:
                room -= sizes[block]
            placement.append((block, tier))
        return replace(plan, placement=tuple(placement),
                       staged_disk=r.staged_disk and any(t == DISK for _, t in placement))

    def _score(self, plan: Plan, int4: bool) -> Choice:
        r, sizes = self.request, self._sizes(int4)
        est = estimate(r.spec, plan, self.profile, prompt_len=r.prompt_len,
                       new_tokens=r.new_tokens, dtype_nbytes=r.dtype_nbytes,
                       int4_group=r.group_size if int4 else None, link_bps=self.caps.link_bps,
                       sizes=sizes, embed_rows=r.embed_rows)
        memory = memory_per_tier(plan, sizes, r)
        return Choice(plan, int4, est, tuple(memory.items()))

    def result(self, best: dict) -> PlannerResult:
        """The chosen candidate and the best distinct others, by predicted tokens/s."""
        chosen = self.choice(best)
        others = [c for c in self.scored.values() if c is not None and c is not chosen]
        others.sort(key=lambda c: -c.estimate.tok_s)  # stable: ties keep evaluation order
        return PlannerResult(chosen, tuple(others[:N_ALTERNATIVES]), len(self.scored))


def _ahead(a: Choice, b: Choice) -> bool:
    """``a`` beats ``b``: faster by more than 0.1 %, or as fast with fewer device bytes."""
    fa, fb = a.estimate.tok_s, b.estimate.tok_s
    if abs(fa - fb) > 1e-3 * max(fa, fb):
        return fa > fb
    return dict(a.memory)[RESIDENT] < dict(b.memory)[RESIDENT]


def memory_per_tier(plan: Plan, sizes: dict[str, int], request: Request) -> dict[str, int]:
    """Bytes the plan keeps on the device, in host RAM and on disk (the activation reserve not
    included). On a CPU device the device's bytes are host RAM too and count in both."""
    spec = request.spec
    kv_full = kv_cache_nbytes(spec, plan.batch, plan.max_len, request.dtype_nbytes)
    kv_slot = kv_full // spec.n_layers // plan.n_micro
    in_slot = slot_block_nbytes(plan, sizes, request.embed_rows)
    device = sum(sizes[b] for b, t in plan.placement if t == RESIDENT)
    device += sum(plan.slot_sizes(in_slot))
    device += plan.n_kv_slots * kv_slot if plan.kv_offloaded else kv_full
    host = sum(sizes[b] for b, t in plan.placement if t == HOST)
    if plan.staged_disk:
        host += sum(plan.slot_sizes({b: n if plan.where(b) == DISK else 0
                                     for b, n in in_slot.items()}))
    if plan.kv_offloaded and not plan.kv_disk:
        host += kv_full
    if request.device_is_host:
        host += device
    disk = sum(sizes[b] for b, t in plan.placement if t == DISK)
    disk += kv_full if plan.kv_disk else 0
    return {RESIDENT: device, HOST: host, DISK: disk}


def slot_block_nbytes(plan: Plan, sizes: dict[str, int], embed_rows: bool) -> dict[str, int]:
    """Bytes each block takes in a weight slot (as the engine sizes its slots): its size, nothing
    for a disk embedding read by rows."""
    return {b: 0 if embed_rows and b == "embed" and t == DISK else sizes[b]
            for b, t in plan.placement}


def fits(plan: Plan, sizes: dict[str, int], request: Request, caps: Caps) -> bool:
    """Whether ``plan`` fits ``caps`` (the device cap less its activation reserve)."""
    memory = memory_per_tier(plan, sizes, request)
    usable = None if caps.device_memory is None else int(
        caps.device_memory * (1 - ACTIVATION_RESERVE_FRACTION))
    if usable is not None and memory[RESIDENT] > usable:
        return False
    return caps.host_memory is None or memory[HOST] <= caps.host_memory
