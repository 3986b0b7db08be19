"""What ``pipo plan`` prints: the chosen plan, its prediction, memory per tier, the next best."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

from pipo.plan import DISK, HOST, RESIDENT
from pipo.planner.engine_plan import caps_for, pins_for, plan_engine, request_for
from pipo.planner.search import Choice
from pipo.planner.speculation import decide


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def summarize(choice: Choice) -> str:
    """One line: weights, placement, KV, micro-batches, slots, schedule."""
    plan = choice.plan
    tiers = Counter(tier for _, tier in plan.placement)
    placed = ", ".join(f"{tiers[t]} {t}" for t in (RESIDENT, HOST, DISK) if tiers[t])
    kv = "device" if not plan.kv_offloaded else "disk" if plan.kv_disk else "host"
    kv += f" ({plan.n_kv_slots} slots)" if plan.kv_offloaded else ""
    return (f"weights {'int4' if choice.int4 else 'dense'}: blocks {placed}; KV {kv}; "
            f"micro-batch {plan.micro_batch} x {plan.n_micro}; weight slots "
            f"{plan.n_weight_slots}; schedule {plan.schedule}")


def _prediction(choice: Choice) -> str:
    e = choice.estimate
    busy = dict(e.busy)
    return (f"{e.tok_s:.1f} tok/s (decode {e.decode_s * 1e3:.1f} ms/step, prefill "
            f"{e.prefill_s * 1e3:.0f} ms); bottleneck {e.bottleneck} "
            f"({100 * busy.get(e.bottleneck, 0):.0f} % busy)")


def explain(engine, batch: int, prompt_len: int, new_tokens: int, profile,
            timeline: Path | None = None, measure: bool = False) -> str:
    """The report of ``pipo plan``; with ``timeline``, the predicted decode step is written too;
    with ``measure``, the plan runs a few decode steps (and their last one is written too)."""
    result = plan_engine(engine, batch, prompt_len + new_tokens, prompt_len=prompt_len,
                         new_tokens=new_tokens, profile=profile)
    caps, best = caps_for(engine), result.best
    memory = dict(best.memory)
    lines = [
        f"workload    batch {batch}, prompt {prompt_len} + {new_tokens} new tokens",
        (f"caps        device {_size(caps.device_memory) if caps.device_memory else 'no limit'}, "
        f"host {_size(caps.host_memory)}, link "
        f"{f'{caps.link_bps / 1e9:g} GB/s' if caps.link_bps else 'as measured'}, int4 "
        f"{'allowed' if caps.allow_int4 else 'not allowed'}"),
        f"profile     {'measured' if profile.measured else 'nominal (run pipo probe)'}",
        f"chosen      {summarize(best)}",
        f"predicted   {_prediction(best)}",
        "lanes       " + ", ".join(f"{lane} {100 * f:.0f} %" for lane, f in best.estimate.busy),
        (f"memory      device {_size(memory[RESIDENT])}, host {_size(memory[HOST])}, "
        f"disk {_size(memory[DISK])}"),
        f"searched    {result.evaluated} plans",
    ]
    lines += _speculation_lines(engine, result, batch, prompt_len, new_tokens, profile)
    if result.alternatives:
        lines.append("next best")
        lines += [f"  {i}. {_prediction(c)}\n     {summarize(c)}"
                  for i, c in enumerate(result.alternatives, 1)]
    if timeline is not None:
        lines.append(f"wrote       {write_predicted(engine, best, prompt_len, new_tokens, profile, timeline)}")
    if measure:
        lines += measured_lines(engine, best, batch, prompt_len, timeline)
    return "\n".join(lines)


def _speculation_lines(engine, result, batch: int, prompt_len: int, new_tokens: int,
                       profile) -> list[str]:
    """What ``--speculate auto`` would do with this workload, why, and the target's plan then when
    the draft's bytes change it."""
    request = request_for(engine, batch, prompt_len + new_tokens, prompt_len, new_tokens)
    decision = decide(request, caps_for(engine), profile, pins_for(engine, batch), result.best)
    lines = [decision.describe()]
    if decision.device_memory is not None and decision.choice is not result.best:
        lines.append(f"  target within {_size(decision.device_memory)}: "
                     f"{_prediction(decision.choice)}\n     {summarize(decision.choice)}")
    return lines


MEASURED_STEPS = 4


def measured_lines(engine, choice: Choice, batch: int, prompt_len: int,
                   timeline: Path | None) -> list[str]:
    """Run ``choice`` for a few steps on a synthetic prompt; the measured decode step next to the
    predicted one (and its timeline beside ``timeline``)."""
    import statistics
    import time
    from dataclasses import replace

    engine.options = replace(engine.options, trace=True, weights="int4" if choice.int4
                             else engine.options.weights)
    engine.runtime.trace = True
    engine.plan_for = lambda b, m: replace(choice.plan, max_len=m)  # exactly the chosen plan
    stamps: list[float] = []
    prompt = [engine.spec.eos_ids[0] if engine.spec.eos_ids else 0] * prompt_len
    gen = engine.generate_ids([prompt] * batch, MEASURED_STEPS + 1,
                              on_step=lambda _: stamps.append(time.perf_counter()))
    periods = [b - a for a, b in itertools.pairwise(stamps)]
    if not periods:
        return ["measured    (every row ended after one token: nothing to compare)"]
    lines = [(f"measured    decode {statistics.median(periods) * 1e3:.1f} ms/step (median of "
             f"{len(periods)}), predicted {choice.estimate.decode_s * 1e3:.1f} ms/step")]
    if timeline is not None and gen.step_stats:
        from pipo.runtime.trace import timeline_png, write_chrome_trace

        path = timeline.with_name(f"{timeline.stem}-measured{timeline.suffix}")
        stats = gen.step_stats[-1]
        if path.suffix.lower() == ".json":
            write_chrome_trace(stats, path)
        else:
            timeline_png(stats, path, title="measured decode step")
        lines.append(f"wrote       {path}")
    return lines


def write_predicted(engine, choice: Choice, prompt_len: int, new_tokens: int, profile,
                    path: Path) -> Path:
    """Write the predicted decode step of ``choice`` as a timeline PNG or a Chrome trace."""
    from graphs import DECODE
    from pipo.engine.weights import embed_by_rows, placed_sizes
    from pipo.planner.estimate import predict_step
    from pipo.runtime.trace import timeline_png, write_chrome_trace

    caps = caps_for(engine)
    group = engine.options.group_size if choice.int4 else None
    pred = predict_step(engine.spec, choice.plan, profile, DECODE,
                        start=prompt_len + new_tokens // 2, t=1,
                        dtype_nbytes=engine.dtype.itemsize, int4_group=group,
                        link_bps=caps.link_bps,
                        sizes=placed_sizes(engine.source, engine.device, engine.dtype, group),
                        embed_rows=embed_by_rows(engine.source))
    if path.suffix.lower() == ".json":
        return write_chrome_trace(pred.stats, path)
    return timeline_png(pred.stats, path, title="predicted decode step")
