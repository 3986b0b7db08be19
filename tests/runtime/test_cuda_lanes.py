"""CUDA lanes: their stream/event protocol on a fake CUDA module (CPU), and real runs on a GPU.

The fake (``tests/runtime/fake_cuda.py``) logs every stream wait, event record and host wait and
tracks what each piece of enqueued work is ordered after, so the tests check the protocol itself:
every task is ordered after exactly its graph ancestors within its step (no race, no lost overlap)
and after the whole previous step; a run costs one caller event when it begins and one caller wait
per sink when it ends; work runs under its lane's stream; only the disk lane blocks the host (through
``wait_event``), and only on what it must.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import networkx as nx
import pytest
import torch

from graphs import build_step
from pipo.plan import estimate_block_nbytes, fixed_plan
from pipo.runtime import Compute, Executors, GraphBuilder, LoadKV, LoadWeight, Runtime, SaveKV, Task
from pipo.runtime.cuda_lanes import HostLane, StreamLane, cuda_lane, enable_timing, wait_event
from pipo.runtime.tasks import DISK, LOAD_WEIGHT
from tests.runtime.fake_cuda import FakeCuda
from tests.runtime.toy import ToyContext, assert_step_done, toy_executors


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
    assert not any(e[0] == "wait_stream" for e in fake.log)
    assert isinstance(done, fake.Event) and done.stream is lane.stream
    assert fake.log[-1] == ("record", lane.stream.name, done)  # no per-task caller wait


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
    assert lane.timed == [] and lane.timed_runs == [] and not lane.timing


def test_wait_event_is_a_no_op_for_none_and_completed_events():
    fake = FakeCuda()
    wait_event(None)
    event = fake.Event()
    wait_event(event)
    event.done = False
    wait_event(event)
    assert [e for e in fake.log if e[0] == "host_wait"] == [("host_wait", event)]


# --- a whole step graph on fake CUDA lanes --------------------------------------------------------

def _decode_graph(schedule: str, n_kv_slots: int = 2):
    from graphs.golden.regen import golden_spec

    spec = golden_spec()
    plan = fixed_plan(spec, estimate_block_nbytes(spec, 4), "host", batch=4, micro_batch=2,
                      max_len=64, kv_offload=True, schedule=schedule, n_kv_slots=n_kv_slots)
    return spec, plan, build_step(spec, plan, "decode")


def _enqueuing(table: Executors, fake: FakeCuda, kinds) -> Executors:
    """``table`` whose executors first tell the fake that (step, task) is enqueued now."""
    logged = table.child()
    for kind in kinds:
        base = table.lookup(kind)

        def run(task, ctx, base=base):
            fake.enqueue((ctx.step, task.name))
            return base(task, ctx)

        logged.register(kind, run)
    return logged


def _toy_runtime(fake: FakeCuda) -> Runtime:
    table = _enqueuing(toy_executors(Executors()), fake, (Compute, LoadWeight, LoadKV, SaveKV))
    return Runtime(executors=table, lane_factory=lambda n: cuda_lane(n, cuda=fake))


def _toy_ctx(spec, step: int) -> ToyContext:
    ctx = ToyContext(spec.block_names(), "decode")
    ctx.step = step
    return ctx


def _caller_waits(fake: FakeCuda, since: int) -> list:
    return [e[2] for e in fake.log[since:] if e[0] == "wait" and e[1] == "caller"]


def _assert_exact_order(fake: FakeCuda, graph: nx.DiGraph, step: int) -> None:
    """Within ``step``, every task is ordered after its graph ancestors and the tasks issued before
    it on its own stream (and their ancestors), and after nothing else of the step."""
    ordered = nx.DiGraph(graph)
    last_on_stream = {}
    for entry in fake.log:
        if entry[0] == "run" and entry[1][0] == step and entry[1][1] in graph:
            name, stream = entry[1][1], entry[2]
            if stream in last_on_stream:
                ordered.add_edge(last_on_stream[stream], name)
            last_on_stream[stream] = name
    for name in graph:
        same_step = {label[1] for label in fake.after[(step, name)]
                     if label[0] == step and label[1] in graph}
        assert same_step == nx.ancestors(ordered, name), name


@pytest.mark.parametrize("schedule", ["sequential", "pipo", "flexgen"])
def test_each_task_is_ordered_after_exactly_its_ancestors_and_the_whole_previous_step(schedule):
    spec, plan, graph = _decode_graph(schedule)
    fake = FakeCuda()
    sinks = [n for n in graph if graph.out_degree(n) == 0]
    with _toy_runtime(fake) as runtime:
        program = runtime.compile(graph)
        for step in (0, 1):
            before = len(fake.log)
            ctx = _toy_ctx(spec, step)
            runtime.run(program, ctx)
            assert_step_done(ctx, plan.n_micro)
            _assert_exact_order(fake, graph, step)
            waits = _caller_waits(fake, before)  # once per sink, after the step's last task
            assert len(waits) == len(sinks) and fake.log[-1][0] == "wait"
            assert fake.caller.deps >= {(step, n) for n in graph}
    previous = {(0, n) for n in graph}
    assert all(fake.after[(1, n)] >= previous for n in graph)  # e.g. SaveKV -> next step's LoadKV
    assert not any(e[0] == "wait_stream" for e in fake.log)


@contextlib.contextmanager
def _after_step_0(trace: bool = False):
    """Fake-CUDA lanes that already ran step 0 of the pipo decode graph (untimed)."""
    spec, plan, graph = _decode_graph("pipo")
    fake = FakeCuda()
    with _toy_runtime(fake) as runtime:
        runtime.trace = trace
        program = runtime.compile(graph)
        runtime.run(program, _toy_ctx(spec, 0))
        yield SimpleNamespace(spec=spec, plan=plan, graph=graph, fake=fake, runtime=runtime,
                              program=program)


def test_a_step_costs_one_caller_event_and_reuses_its_events_the_next_step():
    with _after_step_0() as s:
        first = len(s.fake.log)
        s.runtime.run(s.program, _toy_ctx(s.spec, 1))
        step_log = s.fake.log[first:]
        begin = s.fake.events("record", "caller")[-1]
        assert [e for e in step_log if e[0] == "new_event"] == [("new_event", begin)]
        task_events = [e[2] for e in step_log if e[0] == "record" and e[1] != "caller"]
        assert len(task_events) == len(s.graph) == len(set(map(id, task_events)))  # distinct
        enable_timing(s.runtime.lanes.values())
        s.runtime.run(s.program, _toy_ctx(s.spec, 2))
        lanes = [lane for lane in s.runtime.lanes.values() if lane.timed]
        assert sum(len(lane.timed) for lane in lanes) == len(s.graph)
        assert {run for lane in lanes for run in lane.timed_runs} == {lanes[0].timed_runs[0]}


def test_a_steps_gpu_times_are_picked_by_its_run_id():
    from pipo.bench.steptrace import gpu_step_stats

    with _after_step_0(trace=True) as s:
        lanes = {lane.name: lane for lane in enable_timing(s.runtime.lanes.values())}
        first, second = (s.runtime.run(s.program, _toy_ctx(s.spec, step)) for step in (1, 2))
    gpu = gpu_step_stats(second, lanes)
    assert gpu.run_id == second.run_id != first.run_id
    assert [r.name for r in gpu.records] == [r.name for r in second.records]
    assert min(r.start_s for r in gpu.records) == 0.0  # GPU clock of step 2, not step 1's
    assert all(r.end_s > r.start_s for r in gpu.records)


def test_a_started_step_runs_its_leading_loads_before_the_caller_uploads_and_the_rest_after():
    with _after_step_0() as s:
        spec, plan, graph, fake, runtime, program = (s.spec, s.plan, s.graph, s.fake, s.runtime,
                                                     s.program)
        ctx = _toy_ctx(spec, 1)
        started = runtime.start(program, ctx)
        prefix = {program.names[i] for i, inside in enumerate(program.in_prefix) if inside}
        assert {label[1] for label in fake.after if label[0] == 1} == prefix
        assert prefix and not any(isinstance(graph.nodes[n]["task"], Compute) for n in prefix)
        fake.enqueue((1, "inputs"))  # the caller uploads the step's token ids on its stream
        started.finish()
    assert_step_done(ctx, plan.n_micro)
    _assert_exact_order(fake, nx.DiGraph(graph), 1)
    for name in graph:
        assert ((1, "inputs") in fake.after[(1, name)]) == (name not in prefix), name
        assert fake.after[(1, name)] >= {(0, n) for n in graph}


def test_a_disk_root_host_waits_only_for_the_runs_begin_event():
    @dataclass(frozen=True, slots=True)
    class Work(Task):
        label: str

    fake = FakeCuda(pending=True)
    table = Executors()
    table.register(Work, lambda task, ctx: fake.enqueue(task.label))
    b = GraphBuilder()
    first = b.add(Work("load", lane=LOAD_WEIGHT))
    b.add(Work("after-load", lane=LOAD_WEIGHT), after=[first])
    b.add(Work("read0", lane=DISK))
    b.add(Work("read1", lane=DISK))  # runs after the loads were enqueued
    with Runtime(executors=table, lane_factory=lambda n: cuda_lane(n, cuda=fake)) as runtime:
        runtime.run(b.graph)
    ran = [e[1] for e in fake.log if e[0] == "run"]
    assert ran.index("read1") > ran.index("after-load")
    begin = fake.events("record", "caller")
    assert len(begin) == 1 and not begin[0].deps
    assert fake.events("host_wait") == begin  # not a fresh caller record after the loads' events


def test_lanes_for_a_device_make_their_streams_and_read_the_callers_stream_there(monkeypatch):
    from pipo.engine.options import EngineOptions

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    factory = EngineOptions(device="cuda:1").lane_factory()
    fake = FakeCuda(device="cuda:0")
    lanes = [factory(name, cuda=fake) for name in ("compute", "load_weight", "disk")]
    assert [lane.stream.device for lane in lanes] == [torch.device("cuda:1")] * 3
    table = _enqueuing(Executors(), fake, ())
    table.register(Compute, lambda task, ctx: None)
    b = GraphBuilder()
    b.add(Compute("embed"))
    with Runtime(executors=table, lane_factory=lambda n: factory(n, cuda=fake)) as runtime:
        runtime.run(b.graph)
    assert fake.devices_asked and set(fake.devices_asked) == {torch.device("cuda:1")}


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

    async def both(parallel: bool, begin) -> list:
        """The copy, and the compute either beside it or after it; roots wait on ``begin``."""
        first = await copy_lane.run(copy, [begin])
        second = await compute_lane.run(compute, [begin] if parallel else [first])
        return [first, second]

    def timed(parallel: bool) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(2):  # warm-up, then the timed run
            torch.cuda.synchronize()
            start.record()
            for event in asyncio.run(both(parallel, start)):  # the caller waits on the sinks
                torch.cuda.current_stream().wait_event(event)
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
