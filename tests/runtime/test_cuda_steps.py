"""The engine's step loop on fake CUDA lanes (CPU): the next step's leading loads are enqueued
before the host waits for this step's logits, tokens do not change, and when the loop ends the host
waits once for everything it enqueued (a cancelled next step's loads included)."""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from pipo.bench.random_model import RandomModel
from pipo.bench.workloads import SHAPES
from pipo.engine import Engine, EngineOptions
from pipo.engine.steps import CudaIO
from pipo.runtime import EXECUTORS, LoadWeight, Runtime
from pipo.runtime.cuda_lanes import cuda_lane
from tests.runtime.fake_cuda import FakeCuda

PROMPTS = [[5, 9, 2, 7], [3, 1, 4]]
NEW_TOKENS = 4
SPEC = SHAPES["tiny-llama"]


def _engine(source) -> Engine:
    return Engine(source, EngineOptions(placement="host", kv_offload=True, micro_batch=1))


def _on_fake_cuda(engine: Engine, fake: FakeCuda) -> None:
    """Swap the engine's lanes and device I/O for fake-CUDA ones; each weight load is enqueued
    on the fake as (log position, task name)."""
    table = EXECUTORS.child()
    load = EXECUTORS.lookup(LoadWeight)

    def logged_load(task, ctx):
        fake.enqueue((len(fake.log), task.name))
        return load(task, ctx)

    table.register(LoadWeight, logged_load)
    engine.runtime.close()
    engine.runtime = Runtime(executors=table, lane_factory=partial(cuda_lane, cuda=fake))
    engine.step_io = CudaIO(torch.device("cpu"), cuda=fake, pinned=False)


def _generate_on_fake_cuda(source, fake: FakeCuda):
    with _engine(source) as engine:
        _on_fake_cuda(engine, fake)
        return engine.generate_ids(PROMPTS, NEW_TOKENS,
                                   on_step=lambda fresh: fake.log.append(("sampled",)))


def _assert_the_end_waits_for_every_load(fake: FakeCuda) -> None:
    barrier = fake.events("host_wait")[-1]
    loads = {label for label in fake.after if isinstance(label, tuple)}
    assert loads and barrier.deps >= loads
    assert fake.log.index(("host_wait", barrier)) > max(
        i for i, e in enumerate(fake.log) if e == ("sampled",))


def test_the_next_steps_first_weight_load_is_enqueued_before_the_logits_are_waited_on():
    source = RandomModel(SPEC, seed=3)
    with _engine(source) as reference:
        want = reference.generate_ids(PROMPTS, NEW_TOKENS)
    fake = FakeCuda()
    got = _generate_on_fake_cuda(source, fake)
    assert got.tokens == want.tokens
    runs = [(i, e[1][1]) for i, e in enumerate(fake.log) if e[0] == "run"]
    loads = [i for i, name in runs if name == runs[0][1]]  # each step's first weight load
    logits_waits = [i for i, e in enumerate(fake.log) if e[0] == "host_wait"][:-1]
    sampled = [i for i, e in enumerate(fake.log) if e == ("sampled",)]
    assert len(loads) == len(logits_waits) == len(sampled) == NEW_TOKENS  # no start after the last
    for step in range(NEW_TOKENS - 1):
        assert loads[step + 1] < logits_waits[step] < sampled[step], step
    _assert_the_end_waits_for_every_load(fake)


def test_rows_ending_early_cancel_the_started_step_and_the_host_waits_for_its_loads():
    with _engine(RandomModel(SPEC, seed=3)) as reference:
        tokens = reference.generate_ids(PROMPTS, NEW_TOKENS).tokens
    eos = (tokens[0][1], tokens[1][1])  # both rows end by their second token
    source = RandomModel(dataclasses.replace(SPEC, eos_ids=eos), seed=3)
    fake = FakeCuda()
    got = _generate_on_fake_cuda(source, fake)
    steps = len([e for e in fake.log if e == ("sampled",)])
    assert steps < NEW_TOKENS
    assert all(tokens[row][:len(new)] == new for row, new in enumerate(got.tokens))
    first_load = next(e[1][1] for e in fake.log if e[0] == "run")
    assert sum(1 for e in fake.log if e[0] == "run" and e[1][1] == first_load) == steps + 1
    _assert_the_end_waits_for_every_load(fake)
