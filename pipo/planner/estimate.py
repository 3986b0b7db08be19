"""Predict a plan's speed: build its step graphs, compile them, replay them on the virtual clock.

A decode step is replayed as :class:`pipo.engine.steps.StepLoop` runs it: started early (each lane
takes one prefix task), then the host's per-step work (``step_overhead_s``: logits, sampling),
then the rest; its makespan is the step period. On a CPU the compute lane holds the event loop
(``hog_lane``, :mod:`pipo.runtime.simulate`). The decode step is costed at the middle of the generation
(``prompt_len + new_tokens // 2`` cached positions). Predicted tokens/s is
``batch · new_tokens / (prefill_s + (new_tokens - 1) · decode_s)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from graphs import DECODE, PREFILL, build_step
from pipo.io.spec import ModelSpec
from pipo.plan import Plan
from pipo.planner.costs import task_durations
from pipo.planner.profile import Profile
from pipo.runtime.program import Program, compile_program
from pipo.runtime.registry import Executors
from pipo.runtime.simulate import Prediction, simulate
from pipo.runtime.tasks import COMPUTE, Compute, LoadKV, LoadWeight, ReadBlock, SaveKV


@dataclass(frozen=True)
class Estimate:
    """Predicted seconds per decode step and for the prefill, tokens/s, the decode step's
    bottleneck lane and busy fraction per lane."""

    decode_s: float
    prefill_s: float
    tok_s: float
    bottleneck: str
    busy: tuple[tuple[str, float], ...]


def _no_executors() -> Executors:
    """A table that knows the built-in kinds but runs nothing: compile_program needs one."""
    table = Executors()
    for kind in (Compute, LoadWeight, ReadBlock, LoadKV, SaveKV):
        table.register(kind, _never)
    return table


def _never(task, ctx):  # pragma: no cover - the simulator never executes tasks
    raise RuntimeError("a planner program is only simulated")


_TABLE = _no_executors()


def step_program(spec: ModelSpec, plan: Plan, phase: str) -> Program:
    """The compiled step graph of ``phase`` for ``plan`` (unchecked: builders are tested)."""
    return compile_program(build_step(spec, plan, phase), _TABLE)


def predict_step(spec: ModelSpec, plan: Plan, profile: Profile, phase: str, *, start: int,
                 t: int, dtype_nbytes: int, int4_group: int | None = None,
                 link_bps: float | None = None, program: Program | None = None,
                 sizes: Mapping[str, int] | None = None, embed_rows: bool = False) -> Prediction:
    """The simulated run of one step writing positions ``start .. start+t-1`` (``sizes``: the
    placed block sizes, ``embed_rows``: a disk-tier embedding read by rows; see
    :func:`~pipo.planner.costs.task_durations`)."""
    program = program or step_program(spec, plan, phase)
    duration = task_durations(spec, plan, profile, start=start, t=t, dtype_nbytes=dtype_nbytes,
                              int4_group=int4_group, cap_bps=link_bps, sizes=sizes,
                              embed_rows=embed_rows)
    release = profile.step_overhead_s if phase == DECODE else 0.0
    hog = COMPUTE if profile.device == "cpu" else None  # CPU compute runs on the event loop
    pred = simulate(program, duration, release_s=release, hog_lane=hog)
    if phase == PREFILL:  # nothing of the prefill runs ahead of the host's work
        pred = _shifted(pred, profile.step_overhead_s)
    return pred


def _shifted(pred: Prediction, seconds: float) -> Prediction:
    from pipo.runtime.program import RunStats

    stats = RunStats(wall_s=pred.step_s + seconds, busy_s=pred.busy_s, records=pred.stats.records)
    return Prediction(pred.step_s + seconds, pred.busy_s, stats)


def estimate(spec: ModelSpec, plan: Plan, profile: Profile, *, prompt_len: int, new_tokens: int,
             dtype_nbytes: int, int4_group: int | None = None,
             link_bps: float | None = None, sizes: Mapping[str, int] | None = None,
             embed_rows: bool = False) -> Estimate:
    """The :class:`Estimate` of ``plan`` for prompts of ``prompt_len`` and ``new_tokens`` new
    tokens (``sizes``, ``embed_rows``: as :func:`predict_step` takes them)."""
    common = {"dtype_nbytes": dtype_nbytes, "int4_group": int4_group, "link_bps": link_bps,
              "sizes": sizes, "embed_rows": embed_rows}
    prefill = predict_step(spec, plan, profile, PREFILL, start=0, t=prompt_len, **common)
    if new_tokens > 1:
        decode = predict_step(spec, plan, profile, DECODE, start=prompt_len + new_tokens // 2,
                              t=1, **common)
        decode_s, lanes = decode.step_s, decode
    else:
        decode_s, lanes = 0.0, prefill
    total_s = prefill.step_s + (new_tokens - 1) * decode_s
    busy = tuple(sorted((lane, lanes.busy_fraction(lane)) for lane in lanes.busy_s))
    return Estimate(decode_s, prefill.step_s, plan.batch * new_tokens / total_s,
                    lanes.bottleneck, busy)
