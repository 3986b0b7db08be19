"""The planner as the engine uses it: EngineOptions -> request, caps and pins; the plan back.

Every manual plan option pins its choice (``placement``, ``kv_offload`` / ``kv_disk_dir``,
``micro_batch``, ``n_weight_slots``, ``n_kv_slots``, ``schedule``, ``weights="int4"``); the planner
fills in the rest (:func:`engine_choice` scores the engine's own plan when no cap calls the
planner; :func:`speculation_for` decides ``--speculate auto``). When no candidate fits, the
refusal is a :class:`~pipo.errors.DeviceMemoryTooSmall` naming the exact smallest device memory
with which the planner finds a plan (offloading the KV cache is already among its choices).
"""

from __future__ import annotations

from pipo.plan import DISK
from pipo.planner.profile import Profile, free_ram_nbytes, profile_for
from pipo.planner.search import (
    KV_DISK,
    KV_HOST,
    Caps,
    Choice,
    Pins,
    PlannerResult,
    Request,
    memory_per_tier,
    plan_run,
)
from pipo.planner.speculation import AUTO, DRAFT_GROUP, Speculation, decide, pinned


def request_for(engine, batch: int, max_len: int, prompt_len: int | None = None,
                new_tokens: int | None = None) -> Request:
    """The planner's :class:`Request` for ``engine``: by default half the length is the prompt."""
    from pipo.engine.weights import cpu_packs, embed_by_rows, kept_q8

    o, on_cpu = engine.options, engine.device.type == "cpu"
    prompt_len = prompt_len or max(1, max_len // 2)
    new_tokens = new_tokens or max(1, max_len - prompt_len)
    return Request(engine.spec, batch, max_len, prompt_len, new_tokens,
                   dtype_nbytes=engine.dtype.itemsize, group_size=o.group_size,
                   has_store=o.offload_tier(engine.source) == DISK, kv_disk_ok=on_cpu,
                   device_is_host=on_cpu, staged_disk=o.stage_disk_reads(),
                   int4_packed=cpu_packs(engine.device, engine.dtype, o.group_size),
                   q8=kept_q8(engine.source), embed_rows=embed_by_rows(engine.source))


def caps_for(engine) -> Caps:
    """Caps from the options: device and host memory (default: free RAM), int4, link speed."""
    from pipo.engine.weights import store_is_int4

    o = engine.options
    dense_store = o.offload_tier(engine.source) == DISK and not store_is_int4(engine.source)
    return Caps(device_memory=o.device_memory,
                host_memory=o.host_memory if o.host_memory is not None else free_ram_nbytes(),
                allow_int4=o.allow_int4 and not dense_store,
                link_bps=o.link_gbps * 1e9 if o.link_gbps else None)


def pins_for(engine, batch: int) -> Pins:
    """The choices the options make by hand."""
    o = engine.options
    kv = KV_DISK if o.kv_disk_dir is not None else KV_HOST if o.kv_offload else None
    return Pins(tier=None if o.placement == "auto" else o.placement, kv=kv,
                micro_batch=min(o.micro_batch, batch) if o.micro_batch else None,
                n_weight_slots=o.n_weight_slots, n_kv_slots=o.n_kv_slots, schedule=o.schedule,
                int4=True if o.weights == "int4" else None if o.allow_int4 else False)


def plan_engine(engine, batch: int, max_len: int, *, prompt_len: int | None = None,
                new_tokens: int | None = None, profile: Profile | None = None) -> PlannerResult:
    """The planner's result for ``engine``'s options; the exact budget refusal when none fits."""
    profile = profile or _profile(engine)
    request = request_for(engine, batch, max_len, prompt_len, new_tokens)
    pins = pins_for(engine, batch)
    return plan_run(request, caps_for(engine), profile, pins)


def engine_choice(engine, batch: int, max_len: int, *, prompt_len: int | None = None,
                  new_tokens: int | None = None, profile: Profile | None = None) -> Choice:
    """The plan ``engine`` runs for this workload, scored: the planner's choice under the memory
    caps, else the engine's own plan (placement and slots as the options say) with its
    prediction."""
    from pipo.engine.weights import placed_sizes
    from pipo.planner.estimate import estimate

    profile = profile or _profile(engine)
    o = engine.options
    if o.device_memory is not None or o.host_memory is not None:
        return plan_engine(engine, batch, max_len, prompt_len=prompt_len, new_tokens=new_tokens,
                           profile=profile).best
    request = request_for(engine, batch, max_len, prompt_len, new_tokens)
    plan, group = engine.plan_for(batch, max_len), o.int4_group()
    sizes = placed_sizes(engine.source, engine.device, engine.dtype, group)
    est = estimate(engine.spec, plan, profile, prompt_len=request.prompt_len,
                   new_tokens=request.new_tokens, dtype_nbytes=request.dtype_nbytes,
                   int4_group=group, link_bps=caps_for(engine).link_bps, sizes=sizes,
                   embed_rows=request.embed_rows)
    memory = tuple(memory_per_tier(plan, sizes, request).items())
    return Choice(plan, group is not None, est, memory)


def speculation_for(engine, batch: int, max_len: int, *, pin: str = AUTO,
                    prompt_len: int | None = None, new_tokens: int | None = None,
                    profile: Profile | None = None,
                    group_size: int = DRAFT_GROUP) -> Speculation:
    """Whether ``engine`` should speculate on this workload (:mod:`pipo.planner.speculation`);
    ``pin``: the ``--speculate`` value; ``group_size``: the int4 draft's. When it says ``int4``
    with a ``device_memory``, the target is to run within that cap (the draft holds the rest)."""
    if pin != AUTO:
        return pinned(pin)
    profile = profile or _profile(engine)
    choice = engine_choice(engine, batch, max_len, prompt_len=prompt_len, new_tokens=new_tokens,
                           profile=profile)
    request = request_for(engine, batch, max_len, prompt_len, new_tokens)
    return decide(request, caps_for(engine), profile, pins_for(engine, batch), choice,
                  group_size=group_size)


def _profile(engine) -> Profile:
    """The machine's profile; for an offload store, with the disk costs of that store's own
    blocks (:func:`~pipo.planner.probe_disk.with_store_reads`)."""
    profile = profile_for(engine.options.device, str(engine.dtype).split(".")[-1])
    if engine.options.offload_tier(engine.source) == DISK:
        from pipo.planner.probe_disk import with_store_reads

        profile = with_store_reads(profile, engine.source)
    return profile
