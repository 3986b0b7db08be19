"""CUDA lanes: their stream/event protocol on a fake CUDA module (CPU), and real runs on a GPU.

The fake records every stream wait, event record and host wait in one log, so the tests check the
protocol itself: every graph edge becomes a ``wait_event`` of the consumer's stream on the
producer's event, sources wait for the caller's stream, the caller's stream waits for every task,
work runs under its lane's stream, and only the disk lane blocks the host (through ``wait_event``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest
import torch

from graphs import build_step
from pipo.plan import estimate_block_nbytes, fixed_plan
from pipo.runtime import Compute, Executors, LoadKV, LoadWeight, Runtime, SaveKV
from pipo.runtime.cuda_lanes import HostLane, StreamLane, cuda_lane, enable_timing, wait_event
from tests.runtime.toy import ToyContext, assert_step_done, toy_executors


class FakeCuda:
    """Just enough of ``torch.cuda`` for the lanes; everything it does lands in ``log``."""

    def __init__(self):
        self.log: list[tuple] = []
        self.caller = _FakeStream(self, "caller")
        self._current = self.caller
        self._clock = 0.0
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.stream, self.time_ms, self.done, self.timing = None, None, True, enable_timing

            def record(self, stream=None):
                fake._clock += 1.0
                self.stream, self.time_ms = stream or fake._current, fake._clock
                fake.log.append(("record", self.stream.name, self))

            def query(self):
                return self.done

            def synchronize(self):
                fake.log.append(("host_wait", self))
                self.done = True

            def elapsed_time(self, other):
                return other.time_ms - self.time_ms

        self.Event = Event

    def Stream(self, device=None):  # noqa: N802 - torch.cuda's spelling
        return _FakeStream(self, f"s{sum(1 for e in self.log if e[0] == 'stream')}")

    def current_stream(self, device=None):
        return self._current

    @contextlib.contextmanager
    def stream(self, s):
        previous, self._current = self._current, s
        try:
            yield
        finally:
            self._current = previous


class _FakeStream:
    def __init__(self, fake: FakeCuda, name: str):
        self.fake, self.name, self.device = fake, name, "cuda:0"
        fake.log.append(("stream", name))

    def wait_event(self, event):
        self.fake.log.append(("wait", self.name, event))

    def wait_stream(self, other):
        self.fake.log.append(("wait_stream", self.name, other.name))


def _run_lane(lane, work, after=()):
    return asyncio.run(lane.run(work, after))


def test_a_stream_lane_waits_on_event_predecessors_runs_on_its_stream_and_returns_an_event():
    fake = FakeCuda()
    lane = cuda_lane("compute", cuda=fake)
    assert isinstance(lane, StreamLane)
    pred = fake.Event()
    pred.record(fake.caller)
    seen = []
    done = _run_lane(lane, lambda: seen.append(fake.current_stream()), after=[pred, None])
    assert seen == [lane.stream] and fake.current_stream() is fake.caller
    assert ("wait", lane.stream.name, pred) in fake.log
    assert not any(e[0] == "wait_stream" for e in fake.log)  # not a source: no caller wait
    assert isinstance(done, fake.Event) and done.stream is lane.stream
    assert fake.log[-1] == ("wait", "caller", done)  # the caller's stream is ordered after it


def test_a_source_task_first_waits_for_the_callers_stream():
    fake = FakeCuda()
    lane = cuda_lane("load_weight", cuda=fake)
    _run_lane(lane, lambda: None)
    assert ("wait_stream", lane.stream.name, "caller") in fake.log


def test_a_stream_lane_refuses_async_work_and_closes_the_coroutine():
    fake = FakeCuda()
    lane = cuda_lane("compute", cuda=fake)

    async def reads():
        return None

    coroutine = reads()
    with pytest.raises(TypeError, match="synchronous"):
        _run_lane(lane, lambda: coroutine)
    assert coroutine.cr_frame is None  # closed, so no 'never awaited' warning


def test_the_disk_lane_blocks_the_host_only_through_wait_event_and_awaits_async_work():
    fake = FakeCuda()
    lane = cuda_lane("disk", cuda=fake)
    assert isinstance(lane, HostLane)
    pending = fake.Event()
    pending.record(fake.caller)
    pending.done = False
    ran = []

    async def read():
        ran.append(pending.done)

    done = _run_lane(lane, read, after=[pending])
    assert ran == [True]  # the read started only after the host wait
    assert ("host_wait", pending) in fake.log
    assert isinstance(done, fake.Event)


def test_timing_events_give_intervals_in_run_order():
    fake = FakeCuda()
    lane = cuda_lane("compute", cuda=fake)
    _run_lane(lane, lambda: None)
    assert lane.intervals_ms() == []
    assert enable_timing([lane, object()]) == [lane]
    for _ in range(3):
        _run_lane(lane, lambda: None)
    intervals = lane.intervals_ms()
    assert len(intervals) == 3 and intervals[0][0] == 0.0
    assert all(a < b for a, b in intervals)
    assert all(intervals[i][1] < intervals[i + 1][0] for i in range(2))
    enable_timing([lane], on=False)
    assert lane.timed == [] and not lane.timing


def test_wait_event_is_a_no_op_for_none_and_completed_events():
    fake = FakeCuda()
    wait_event(None)
    event = fake.Event()
    wait_event(event)
    event.done = False
    wait_event(event)
    assert fake.log == [("stream", "caller"), ("host_wait", event)]


def _protocol(log: list[tuple]) -> tuple[dict, dict, set]:
    """Per task: the events its stream waited on before it ran, and the event recorded after it;
    and the events the caller's stream waited on."""
    waits, produced, pending, last_run = {}, {}, {}, {}
    for entry in log:
        if entry[0] == "wait" and entry[1] != "caller":
            pending.setdefault(entry[1], []).append(entry[2])
        elif entry[0] == "run":
            name, stream = entry[1], entry[2]
            waits[name] = pending.pop(stream, [])
            last_run[stream] = name
        elif entry[0] == "record" and entry[1] in last_run:
            produced[last_run.pop(entry[1])] = entry[2]
    caller_waits = {e[2] for e in log if e[0] == "wait" and e[1] == "caller"}
    return waits, produced, caller_waits


@pytest.mark.parametrize("schedule", ["sequential", "pipo", "flexgen"])
def test_every_graph_edge_becomes_a_stream_wait_on_the_producers_event(schedule):
    from graphs.golden.regen import golden_spec

    spec = golden_spec()
    plan = fixed_plan(spec, estimate_block_nbytes(spec, 4), "host", batch=4, micro_batch=2,
                      max_len=64, kv_offload=True, schedule=schedule)
    graph = build_step(spec, plan, "decode")
    fake = FakeCuda()
    table = toy_executors(Executors())
    for kind in (Compute, LoadWeight, LoadKV, SaveKV):
        base = table.lookup(kind)
        table.register(kind, _logged(base, fake))
    ctx = ToyContext(spec.block_names(), "decode")
    with Runtime(executors=table, lane_factory=lambda n: cuda_lane(n, cuda=fake)) as runtime:
        runtime.run(graph, ctx)
    assert_step_done(ctx, plan.n_micro)
    waits, produced, caller_waits = _protocol(fake.log)
    assert set(produced) == set(graph) == set(waits)
    for src, dst in graph.edges:
        assert produced[src] in waits[dst], (src, dst)
    assert caller_waits == set(produced.values())
    sources = [n for n in graph if graph.in_degree(n) == 0]
    assert sum(1 for e in fake.log if e[0] == "wait_stream") == len(sources)


def _logged(fn, fake: FakeCuda):
    def run(task, ctx):
        fake.log.append(("run", task.name, fake.current_stream().name))
        return fn(task, ctx)

    return run


# --- on a GPU (run by benchmarks/device_run.sh through `pytest -m gpu`) -------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_gpu_copy_and_compute_lanes_overlap():
    """A pinned H2D copy on one lane and matmuls on another take less than their sum."""
    copy_lane, compute_lane = cuda_lane("load_weight"), cuda_lane("compute")
    src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)

    def copy():
        dst.copy_(src, non_blocking=True)

    def compute():
        for _ in range(40):
            a @ a

    async def both(parallel: bool):
        first = await copy_lane.run(copy, [])
        await compute_lane.run(compute, [] if parallel else [first])
        await copy_lane.run(lambda: None, [])

    def timed(parallel: bool) -> float:
        asyncio.run(both(parallel))  # warm-up
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        asyncio.run(both(parallel))
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    serial_ms, parallel_ms = timed(False), timed(True)
    assert parallel_ms < 0.85 * serial_ms, (serial_ms, parallel_ms)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("placement,kv_offload", [("host", True), ("host", False),
                                                  ("resident", False)])
def test_gpu_every_schedule_makes_the_same_tokens_as_the_cpu(placement, kv_offload):
    from pipo.bench.pipo_runs import make_engine, make_source, random_prompts
    from pipo.bench.workloads import resolve

    workload = resolve("quick", shape="tiny-llama", prompt_len=12, gen_len=8, batch=4,
                       micro_batch=2)
    workload = dataclasses.replace(workload, placement=placement, kv_offload=kv_offload)
    source = make_source(workload)
    prompts = random_prompts(workload, workload.prompt_len)
    with make_engine(workload, source, "cpu", "pipo", False) as cpu_engine:
        want = cpu_engine.generate_ids(prompts, workload.gen_len, keep_logits=True)
    for schedule in ("pipo", "flexgen", "sequential"):
        with make_engine(workload, source, "cuda", schedule, False, dtype="float32") as engine:
            got = engine.generate_ids(prompts, workload.gen_len, keep_logits=True)
        assert got.tokens == want.tokens, schedule
        torch.testing.assert_close(got.logits[0], want.logits[0], atol=2e-3, rtol=1e-3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("what", ["load_weight", "load_kv", "save_kv"])
def test_gpu_lane_copies_queue_behind_gpu_work_without_blocking_the_host(what):
    """A lane only enqueues: a copy issued behind ~100 ms of GPU work must return at once.

    A copy to or from pageable memory, or between non-contiguous host and device tensors, makes
    torch stage it through the host and wait for the stream: then the host cannot run ahead of the
    GPU and the lanes stop overlapping. This catches such a copy in the engine's executors.
    """
    import time

    from pipo.bench.random_model import RandomModel
    from pipo.bench.workloads import SHAPES
    from pipo.engine.kv import KVCache
    from pipo.engine.weights import PlacedWeights

    spec = SHAPES["tiny-llama"]
    plan = fixed_plan(spec, estimate_block_nbytes(spec, 2), "host", batch=4, micro_batch=2,
                      max_len=256, kv_offload=True)
    device = torch.device("cuda")
    weights = PlacedWeights(RandomModel(spec), plan, device=device, dtype=torch.float16)
    kv = KVCache(spec, plan, device=device, dtype=torch.float16)
    kv.for_compute(0, 0, 0)
    calls = {"load_weight": lambda: weights.load("L0.attn", 0),
             "load_kv": lambda: kv.load(0, 0, 0, 200),
             "save_kv": lambda: kv.save(0, 0, 0, 200, 1)}
    stream = torch.cuda.Stream()
    calls[what]()  # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~100 ms of GPU time on this stream
        t0 = time.perf_counter()
        calls[what]()
        host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert host_s < 0.02, f"{what} blocked the host for {host_s * 1e3:.0f} ms"
