"""The engine's step loop on fake CUDA lanes (CPU): the next step's leading loads are enqueued
before the host waits for this step's logits, and tokens do not change."""

from __future__ import annotations

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


def _engine(source) -> Engine:
    return Engine(source, EngineOptions(placement="host", kv_offload=True, micro_batch=1))


def _on_fake_cuda(engine: Engine, fake: FakeCuda) -> None:
    """Swap the engine's lanes and device I/O for fake-CUDA ones that log each weight load."""
    table = EXECUTORS.child()
    load = EXECUTORS.lookup(LoadWeight)

    def logged_load(task, ctx):
        fake.log.append(("run", task.name))
        return load(task, ctx)

    table.register(LoadWeight, logged_load)
    engine.runtime.close()
    engine.runtime = Runtime(executors=table, lane_factory=partial(cuda_lane, cuda=fake))
    engine.step_io = CudaIO(torch.device("cpu"), cuda=fake, pinned=False)


def test_the_next_steps_first_weight_load_is_enqueued_before_the_logits_are_waited_on():
    source = RandomModel(SHAPES["tiny-llama"], seed=3)
    with _engine(source) as reference:
        want = reference.generate_ids(PROMPTS, NEW_TOKENS)
    fake = FakeCuda()
    with _engine(source) as engine:
        _on_fake_cuda(engine, fake)
        got = engine.generate_ids(PROMPTS, NEW_TOKENS,
                                  on_step=lambda fresh: fake.log.append(("sampled",)))
    assert got.tokens == want.tokens
    first_load = next(e for e in fake.log if e[0] == "run")
    loads = [i for i, e in enumerate(fake.log) if e == first_load]
    logits_waits = [i for i, e in enumerate(fake.log) if e[0] == "host_wait"]
    sampled = [i for i, e in enumerate(fake.log) if e == ("sampled",)]
    assert len(loads) == len(logits_waits) == len(sampled) == NEW_TOKENS  # no start after the last
    for step in range(NEW_TOKENS - 1):
        assert loads[step + 1] < logits_waits[step] < sampled[step], step
