"""Benchmark numbers, defined once (BENCH.md's definitions, which are FlexGen's).

- throughput: prefill = batch × prompt_len / t_prefill; decode = batch × (gen_len − 1) / t_decode;
  total = batch × gen_len / (t_prefill + t_decode).
- GPU busy fraction: union of the compute lane's task intervals (CUDA events) / decode wall time.
- link limit: H2D bytes per decode step / pinned H2D bandwidth measured in the same run;
  pipeline efficiency = link-limit time / measured decode step time.
- NVML utilization sampled during decode (:class:`NvmlSampler`), the number nvidia-smi shows.
- copy bandwidth (:func:`copy_gbps`): a large pinned host → device copy on CUDA (a host → host copy
  on CPU, where the "link" is memory bandwidth), median of a few timed copies.
- pinned host memory (:func:`pinned_memory`): bytes page-locked by pipo's host arenas next to the
  bytes of data they hold (so a row shows any rounding overhead), and what torch's own pinned
  allocator holds (on CUDA; it rounds each allocation up to a power of two).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import torch

from pipo.io.spec import ModelSpec
from pipo.plan import Plan, estimate_block_nbytes
from pipo.runtime import memory
from pipo.runtime.trace import union_s

GB = 1e9


@dataclass(frozen=True)
class Throughput:
    """Tokens per second of one generation run, per BENCH.md."""

    prefill_tok_s: float
    decode_tok_s: float
    total_tok_s: float


def throughput(batch: int, prompt_len: int, gen_len: int, prefill_s: float,
               decode_s: float) -> Throughput:
    """Prefill, decode and total throughput of a run that made ``gen_len`` tokens per row."""
    return Throughput(
        prefill_tok_s=batch * prompt_len / prefill_s if prefill_s > 0 else 0.0,
        decode_tok_s=batch * (gen_len - 1) / decode_s if decode_s > 0 else 0.0,
        total_tok_s=batch * gen_len / (prefill_s + decode_s) if prefill_s + decode_s > 0 else 0.0)


def busy_fraction(intervals_s: list[tuple[float, float]], wall_s: float) -> float:
    """Union of ``intervals_s`` over ``wall_s`` (0.0 when the wall time is zero)."""
    return union_s(intervals_s) / wall_s if wall_s > 0 else 0.0


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step moves host -> device (weights, KV) and device -> host (KV)."""

    weights_nbytes: int
    kv_load_nbytes: int
    kv_save_nbytes: int

    @property
    def h2d_nbytes(self) -> int:
        """Everything that crosses host -> device."""
        return self.weights_nbytes + self.kv_load_nbytes


def decode_step_bytes(spec: ModelSpec, plan: Plan, *, prompt_len: int, gen_len: int,
                      dtype_nbytes: int, int4_group: int | None = None) -> StepBytes:
    """Average bytes per decode step: streamed blocks every step, and the offloaded KV prefix.

    A decode step at cache position ``start`` loads ``start`` positions of K and V of every layer and
    saves one; the average runs over the ``gen_len - 1`` decode steps.
    """
    sizes = estimate_block_nbytes(spec, dtype_nbytes, int4_group)
    weights = sum(sizes[b] for b in plan.streamed())
    if not plan.kv_offloaded:
        return StepBytes(weights, 0, 0)
    per_position = 2 * spec.n_layers * plan.batch * spec.n_kv_heads * spec.head_dim * dtype_nbytes
    starts = range(prompt_len, prompt_len + gen_len - 1)
    mean_start = sum(starts) / max(len(starts), 1)
    return StepBytes(weights, int(per_position * mean_start), per_position)


@dataclass(frozen=True)
class LinkReport:
    """How close decode ran to the link: limit per step, achieved bandwidth, efficiency."""

    h2d_nbytes_per_step: int
    link_gbps: float
    link_limit_s: float
    step_s: float
    achieved_gbps: float
    pipeline_efficiency: float


def link_report(step_bytes: StepBytes, link_gbps: float, decode_s: float,
                n_decode_steps: int) -> LinkReport:
    """The link limit of a decode step and how a measured decode compares with it."""
    step_s = decode_s / n_decode_steps if n_decode_steps else 0.0
    nbytes = step_bytes.h2d_nbytes
    limit_s = nbytes / (link_gbps * GB) if link_gbps > 0 else 0.0
    return LinkReport(nbytes, link_gbps, limit_s, step_s,
                      achieved_gbps=nbytes / step_s / GB if step_s > 0 else 0.0,
                      pipeline_efficiency=limit_s / step_s if step_s > 0 else 0.0)


def copy_gbps(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bandwidth of a large copy into ``device`` memory: pinned H2D on CUDA, memcpy on CPU."""
    if device.type == "cuda":
        return _cuda_h2d_gbps(device, nbytes, repeats)
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / GB


def _cuda_h2d_gbps(device: torch.device, nbytes: int, repeats: int) -> float:
    # pinned like the engine's buffers, and unpinned afterwards (torch's allocator would keep it)
    arena = memory.HostArena(nbytes, memory.default_registrar(device), name="copy probe")
    src = arena.take(nbytes).fill_(1)
    arena.pin()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    try:
        dst.copy_(src, non_blocking=True)  # warm-up
        times_ms = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times_ms.append(start.elapsed_time(end))
    finally:
        arena.close()
    return nbytes / (statistics.median(times_ms) / 1e3) / GB


def pinned_memory(device: torch.device) -> dict[str, int | None]:
    """Host memory now: pipo's arenas (``pinned_nbytes`` page-locked for ``host_data_nbytes`` of
    data) and torch's pinned allocator (``torch_pinned_nbytes``, CUDA only, rounded block sizes)."""
    stats = memory.arena_stats()
    torch_pinned = None
    if device.type == "cuda" and hasattr(torch.cuda, "host_memory_stats"):
        torch_pinned = torch.cuda.host_memory_stats().get("allocated_bytes.current")
    return {"pinned_nbytes": stats["pinned_nbytes"], "host_data_nbytes": stats["data_nbytes"],
            "torch_pinned_nbytes": torch_pinned}


class NvmlSampler:
    """Samples NVML GPU utilization (%) in a thread between :meth:`start` and :meth:`stop`.

    ``available`` is False (and :meth:`stop` returns ``None``) without pynvml / a GPU.
    """

    def __init__(self, device_index: int = 0, period_s: float = 0.01):
        self.period_s = period_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:  # noqa: BLE001 - no NVML: report no number rather than fail the bench
            self._nvml = None

    @property
    def available(self) -> bool:
        """True when NVML answered."""
        return self._handle is not None

    def start(self) -> None:
        """Begin sampling (no-op without NVML or when already sampling)."""
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pipo-nvml", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self._stop.wait(self.period_s)

    def stop(self) -> float | None:
        """Stop sampling; the mean utilization in percent (``None`` without samples)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return statistics.fmean(self.samples) if self.samples else None


def peak_gpu_nbytes(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` on CUDA, ``None`` elsewhere."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak_gpu(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
