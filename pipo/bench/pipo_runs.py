"""pipo on a benchmark workload: one engine over a random-weight model, one row per schedule.

The engine is built once per workload (weights placed once) and each schedule runs on it: a short
warm-up generation (compiles the schedule's step graphs, creates the lanes), then one timed
generation of ``gen_len`` tokens for the whole batch. Every step runs; nothing is extrapolated.
On CUDA the lanes' timing events are switched on after the prefill step, so the compute lane's
intervals cover exactly the decode steps (GPU busy fraction), and NVML is sampled over the decode.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pipo.bench import metrics
from pipo.bench.random_model import RandomModel
from pipo.bench.steptrace import gpu_step_stats, write_step_trace
from pipo.bench.workloads import Workload
from pipo.runtime.tasks import COMPUTE, LOAD_KV, LOAD_WEIGHT

WARMUP_PROMPT_LEN = 32
INT4_GROUP = 64


def make_source(workload: Workload, seed: int = 0, store_dir: str | None = None):
    """The random model of ``workload`` (written to an offload store for disk placement)."""
    int4 = INT4_GROUP if workload.weights == "int4" else None
    source = RandomModel(workload.spec(), seed=seed, int4_group=int4)
    if workload.placement != "disk":
        return source
    from pipo.io.source import open_model
    from pipo.io.store_write import convert

    path = Path(store_dir or tempfile.mkdtemp(prefix="pipo-bench-store-")) / workload.shape
    return open_model(convert(source, path, weights="keep", overwrite=True))


def make_engine(workload: Workload, source, device: str, schedule: str, trace: bool,
                dtype: str | None = None):
    """An Engine for ``workload`` on ``device`` (``dtype`` default: fp16 on CUDA, fp32 on CPU)."""
    from pipo.engine import Engine, EngineOptions

    options = EngineOptions(
        device=device, dtype=dtype or ("float16" if device == "cuda" else None),
        weights="int4" if workload.weights == "int4" else "auto", group_size=INT4_GROUP,
        device_memory=workload.gpu_memory if workload.placement == "auto" else None,
        placement=workload.placement, kv_offload=workload.kv_offload, schedule=schedule,
        micro_batch=workload.micro_batch, trace=trace)
    return Engine(source, options)


def random_prompts(workload: Workload, length: int, seed: int = 0) -> list[list[int]]:
    """``batch`` copies of one random prompt of ``length`` ids (FlexGen also repeats one prompt)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, workload.spec().vocab_size, (length,), generator=generator).tolist()
    return [list(ids) for _ in range(workload.batch)]


def run_schedules(workload: Workload, device: str, schedules: list[str], *,
                  trace_dir: str | None = None, link_gbps: float = 0.0, seed: int = 0,
                  on_row: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """One result row per schedule (a row with ``error`` when that schedule failed).

    ``on_row`` sees each row as soon as it exists (the CLI saves its JSON after every row).
    """
    if not schedules:
        return []
    with tempfile.TemporaryDirectory(prefix="pipo-bench-store-") as store_dir:
        source = make_source(workload, seed, store_dir)
        try:
            return _run_all(workload, source, device, schedules, trace_dir, link_gbps, seed, on_row)
        finally:
            getattr(source, "close", lambda: None)()


def _run_all(workload, source, device, schedules, trace_dir, link_gbps, seed, on_row):
    engine = make_engine(workload, source, device, schedules[0], trace=True)
    rows = []
    try:
        for schedule in schedules:
            engine.options = dataclasses.replace(engine.options, schedule=schedule)
            try:
                rows.append(_run_one(engine, workload, schedule, trace_dir, link_gbps, seed))
            except Exception as exc:  # noqa: BLE001 - one failed row must not lose the others
                rows.append(error_row("pipo", schedule, exc))
                _free_cuda(engine.device)
            if on_row is not None:
                on_row(rows[-1])
    finally:
        engine.close()
    return rows


def error_row(system: str, schedule: str | None, exc: BaseException) -> dict[str, Any]:
    """A result row that records a failure."""
    return {"system": system, "schedule": schedule, "error": f"{type(exc).__name__}: {exc}"}


def _free_cuda(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_one(engine, workload: Workload, schedule: str, trace_dir: str | None,
             link_gbps: float, seed: int) -> dict[str, Any]:
    """Warm up, then time one generation of ``workload`` with ``schedule``."""
    from pipo.runtime.cuda_lanes import enable_timing

    engine.generate_ids(random_prompts(workload, WARMUP_PROMPT_LEN, seed), 2)
    prompts = random_prompts(workload, workload.prompt_len, seed)
    sampler = metrics.NvmlSampler(_device_index(engine.device))
    timed: list = []

    def on_decode(_fresh) -> None:
        if not timed:  # after the prefill step: time exactly the decode steps
            timed.extend(enable_timing(engine.runtime.lanes.values()))
            sampler.start()

    metrics.reset_peak_gpu(engine.device)
    t0 = time.perf_counter()
    gen = engine.generate_ids(prompts, workload.gen_len, on_step=on_decode)
    wall_s = time.perf_counter() - t0
    nvml_pct = sampler.stop()
    row = _metrics_row(engine, workload, schedule, gen, link_gbps)
    row.update(wall_s=wall_s, nvml_util_pct=nvml_pct, **metrics.pinned_memory(engine.device))
    lanes = {lane.name: lane for lane in timed}
    row.update(_gpu_lane_metrics(lanes, gen.decode_s, row["h2d_nbytes_per_step"] * (gen.steps - 1)))
    row["compute_busy_frac"] = row["gpu_busy_frac"] if lanes else _host_compute_busy(gen)
    if trace_dir is not None and gen.step_stats:
        row["trace"] = _write_trace(engine, gen, lanes, trace_dir, f"{workload.id}_{schedule}")
    enable_timing(timed, on=False)
    return row


def _device_index(device: torch.device) -> int:
    if device.type != "cuda" or device.index is None:
        return 0
    return device.index


def _host_compute_busy(gen) -> float | None:
    """Compute lane's busy share of the decode steps from host task records (CPU lanes)."""
    from pipo.runtime.trace import union_s

    steps = gen.step_stats[1:]
    if not steps or gen.decode_s <= 0:
        return None
    busy_s = sum(union_s((r.start_s, r.end_s) for r in s.records if r.lane == COMPUTE)
                 for s in steps)
    return busy_s / gen.decode_s


def _metrics_row(engine, workload: Workload, schedule: str, gen, link_gbps: float) -> dict:
    tput = metrics.throughput(workload.batch, workload.prompt_len, gen.steps, gen.prefill_s,
                              gen.decode_s)
    int4 = INT4_GROUP if workload.weights == "int4" else None
    step_bytes = metrics.decode_step_bytes(engine.spec, gen.plan, prompt_len=workload.prompt_len,
                                           gen_len=gen.steps, dtype_nbytes=engine.dtype.itemsize,
                                           int4_group=int4)
    link = metrics.link_report(step_bytes, link_gbps, gen.decode_s, gen.steps - 1)
    peak = metrics.peak_gpu_nbytes(engine.device)
    decode_stats = gen.step_stats[1:]
    return {
        "system": "pipo", "schedule": schedule, "steps": gen.steps,
        # scheduler + launches of one decode step (on CUDA the run returns once all is enqueued)
        "host_ms_per_step": 1e3 * sum(s.wall_s for s in decode_stats) / len(decode_stats)
        if decode_stats else None,
        "t_prefill_s": gen.prefill_s, "t_decode_s": gen.decode_s,
        **dataclasses.asdict(tput),
        "h2d_nbytes_per_step": link.h2d_nbytes_per_step,
        "weights_nbytes_per_step": step_bytes.weights_nbytes,
        "kv_load_nbytes_per_step": step_bytes.kv_load_nbytes,
        "link_gbps": link.link_gbps, "link_limit_s_per_step": link.link_limit_s,
        "step_s": link.step_s, "achieved_h2d_gbps": link.achieved_gbps,
        "pipeline_efficiency": link.pipeline_efficiency,
        "peak_gpu_nbytes": peak, "gpu_cap_nbytes": workload.gpu_memory,
        "under_cap": None if peak is None or workload.gpu_memory is None
        else peak <= workload.gpu_memory,
        "plan": {"placement": sorted({tier for _, tier in gen.plan.placement}),
                 "n_micro": gen.plan.n_micro, "kv_offloaded": gen.plan.kv_offloaded,
                 "n_weight_slots": gen.plan.n_weight_slots},
    }


def _gpu_lane_metrics(lanes: dict, decode_s: float, h2d_nbytes: int) -> dict:
    """GPU busy fraction of the compute lane and H2D bandwidth while the copy lanes were busy."""
    if not lanes:
        return {"gpu_busy_frac": None, "h2d_gbps_while_copying": None}
    from pipo.runtime.trace import union_s

    def intervals_s(names):
        found = [lanes[n] for n in names if n in lanes]
        start = [lane.timed[0][0] for lane in found if lane.timed]
        if not start:
            return []
        ref = start[0]
        return [(a / 1e3, b / 1e3) for lane in found for a, b in lane.intervals_ms(ref)]

    busy = metrics.busy_fraction(intervals_s([COMPUTE]), decode_s)
    copying_s = union_s(intervals_s([LOAD_WEIGHT, LOAD_KV]))
    return {"gpu_busy_frac": busy,
            "h2d_gbps_while_copying": h2d_nbytes / copying_s / metrics.GB if copying_s else None}


def _write_trace(engine, gen, lanes: dict, trace_dir: str, label: str) -> dict[str, str]:
    """Trace files of the steady-state decode step (the middle one)."""
    step = len(gen.step_stats) // 2  # step_stats[0] is the prefill
    host = gen.step_stats[step]
    if lanes:
        host = gpu_step_stats(host, lanes)
    return write_step_trace(host, trace_dir, label)
