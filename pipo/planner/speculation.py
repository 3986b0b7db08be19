"""Whether to speculate: the planner's ``--speculate auto`` decision.

An int4 draft (group :data:`DRAFT_GROUP`, resident) pays when a decode step waits on its weights:
one verification pass streams the weights once for several drafted tokens. So speculation
``int4`` is turned on only when

(a) the workload is batch 1 (a latency goal or a single prompt),
(b) the chosen plan's predicted decode step is link-bound: its bottleneck lane (the simulator's,
    :mod:`pipo.planner.estimate`) is a weight-load or disk lane, not compute, and
(c) the memory caps have room for the draft (:func:`draft_nbytes`) besides the plan. The search
    fills the device cap with resident blocks, so the target is planned again within the cap less
    the draft's bytes (fewer resident blocks, more streamed: still link-bound, or no speculation);
    on a CPU the draft's bytes count against the host cap too.

Otherwise speculation stays off; everything resident (no cap) is compute-bound, so off. An explicit
``--speculate off|int4|ngram|MODEL`` pins the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipo.errors import PlanError
from pipo.plan import (
    ACTIVATION_RESERVE_FRACTION,
    HOST,
    RESIDENT,
    estimate_block_nbytes,
    kv_cache_nbytes,
)
from pipo.runtime.tasks import DISK, LOAD_WEIGHT

AUTO, OFF, INT4 = "auto", "off", "int4"
DRAFT_GROUP = 128
DRAFT_DTYPE_NBYTES = 2  # the int4 path computes in bf16 on a CPU, fp16 on CUDA
LINK_LANES = (LOAD_WEIGHT, DISK)


@dataclass(frozen=True)
class Speculation:
    """The decision: ``kind`` (``int4``, ``off``, or the pinned ``--speculate`` value), why, the
    draft's bytes (when on), and the target's plan to run with it (``choice``: a
    :class:`~pipo.planner.search.Choice`; ``device_memory``: the cap it was planned within, bytes,
    when the draft's bytes were taken out of ``--device-memory``)."""

    kind: str
    reason: str
    draft_nbytes: int = 0
    choice: object = None
    device_memory: int | None = None

    def describe(self) -> str:
        """``speculation int4: decode is link-bound (...) and the 80 MiB draft fits``."""
        return f"speculation {self.kind}: {self.reason}"


def draft_nbytes(request, plan, group_size: int = DRAFT_GROUP) -> int:
    """Bytes the resident int4 draft of ``request.spec`` adds: its int4 attention and MLP blocks,
    its embedding and head unless ``plan`` keeps the target's resident (the draft shares those),
    and its one-row KV cache of ``request.max_len`` positions, in the int4 path's 2-byte dtype."""
    sizes = estimate_block_nbytes(request.spec, DRAFT_DTYPE_NBYTES, group_size,
                                  cpu_packed=request.device_is_host)
    shared = {b for b, tier in plan.placement if tier == RESIDENT and b in ("embed", "head")}
    kv = kv_cache_nbytes(request.spec, 1, request.max_len, DRAFT_DTYPE_NBYTES)
    return sum(n for block, n in sizes.items() if block not in shared) + kv


def decide(request, caps, profile, pins, choice, pin: str = AUTO,
           group_size: int = DRAFT_GROUP) -> Speculation:
    """The speculation for ``request`` whose best plan under ``caps`` is ``choice`` (see the module
    docstring); ``pin``: the ``--speculate`` value (``auto`` lets the planner decide);
    ``group_size``: the int4 draft's group."""
    if pin != AUTO:
        return pinned(pin, choice)
    if request.batch > 1:
        return _off(f"batch {request.batch} (a draft pays at batch 1 only)", choice)
    lane = _lane_text(choice)
    if choice.estimate.bottleneck not in LINK_LANES:
        return _off(f"decode is compute-bound ({lane})", choice)
    target, cap = choice, caps.device_memory
    if cap is not None:
        target, cap = _room_for_draft(request, caps, profile, pins, choice, group_size)
        if target is None:
            return _off(f"decode is link-bound ({lane}) but no plan fits --device-memory "
                        f"besides the int4 draft ({_mib(cap)})", choice)
        if target.estimate.bottleneck not in LINK_LANES:
            return _off(f"the plan that leaves room for the draft is compute-bound "
                        f"({_lane_text(target)})", choice)
    need = draft_nbytes(request, target.plan, group_size)
    if not _fits(need, target, request, caps):
        return _off(f"decode is link-bound ({lane}) but the {_mib(need)} draft does not fit "
                    "the memory caps", choice)
    return Speculation(INT4, f"decode is link-bound ({lane}) and the {_mib(need)} draft fits",
                       need, target, cap)


def _room_for_draft(request, caps, profile, pins, choice, group_size: int):
    """``(plan, cap)``: the best plan within ``--device-memory`` less the draft's bytes, and that
    cap; first counting the draft as sharing ``choice``'s resident embedding and head, and if the
    plan found does not keep them, as sharing nothing. ``(None, draft bytes)`` when none fits."""
    usable = 1 - ACTIVATION_RESERVE_FRACTION
    for plan in (choice.plan, _nothing_resident(choice.plan)):
        need = draft_nbytes(request, plan, group_size)
        cap = caps.device_memory - -(-need // usable)
        target = _replanned(request, replace(caps, device_memory=cap), profile, pins)
        if target is not None and _fits(draft_nbytes(request, target.plan, group_size), target,
                                        request, caps):
            return target, cap
    return None, need


def pinned(pin: str, choice=None) -> Speculation:
    """The choice an explicit ``--speculate`` value makes."""
    return Speculation(pin, "pinned by --speculate", choice=choice)


def _off(reason: str, choice) -> Speculation:
    return Speculation(OFF, reason, choice=choice)


def _lane_text(choice) -> str:
    e = choice.estimate
    return f"{e.bottleneck} lane {100 * dict(e.busy).get(e.bottleneck, 0.0):.0f} % busy"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


def _nothing_resident(plan):
    """``plan`` as if no block were resident: the draft then shares nothing (an upper bound)."""
    return replace(plan, placement=tuple((b, HOST) for b, _ in plan.placement))


def _replanned(request, caps, profile, pins):
    """The best plan under ``caps``, or ``None`` when none fits."""
    from pipo.planner.search import plan_run

    try:
        return plan_run(request, caps, profile, pins).best
    except PlanError:
        return None


def _fits(need: int, target, request, caps) -> bool:
    """Whether ``need`` more bytes fit on the device (less its activation reserve) and, on a CPU,
    in host RAM, besides ``target``'s own."""
    memory = dict(target.memory)
    if caps.device_memory is not None:
        usable = int(caps.device_memory * (1 - ACTIVATION_RESERVE_FRACTION))
        if memory[RESIDENT] + need > usable:
            return False
    host_need = need if request.device_is_host else 0
    return caps.host_memory is None or memory[HOST] + host_need <= caps.host_memory
