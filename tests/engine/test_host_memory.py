"""Host arenas: exact pinned bytes, one registration per mapping, released on close.

A fake registrar stands in for cudaHostRegister (the CPU torch build cannot pin): it records the
ranges, refuses overlaps and double registrations like the CUDA driver does, and counts pinned bytes.
"""

from __future__ import annotations

import gc

import pytest
import torch

from pipo.bench import metrics
from pipo.bench.random_model import RandomModel
from pipo.bench.workloads import SHAPES
from pipo.runtime import memory
from pipo.runtime.memory import PAGE_NBYTES, HostArena


class FakeRegistrar:
    """Records registered ranges like the CUDA driver: no overlap, unregister only what exists."""

    def __init__(self):
        self.ranges: dict[int, int] = {}
        self.calls = 0

    def register(self, ptr: int, nbytes: int) -> None:
        assert all(ptr + nbytes <= p or p + n <= ptr for p, n in self.ranges.items()), "overlap"
        self.ranges[ptr] = nbytes
        self.calls += 1

    def unregister(self, ptr: int) -> None:
        del self.ranges[ptr]

    @property
    def pinned_nbytes(self) -> int:
        return sum(self.ranges.values())


def test_views_are_aligned_writable_and_pinned_as_one_page_rounded_range():
    fake = FakeRegistrar()
    arena = HostArena(1 << 20, fake)
    a = arena.take(1000)
    b = arena.take(5000, align_nbytes=4096)
    a.fill_(1)
    b.fill_(2)
    assert b.data_ptr() % 4096 == 0 and a.data_ptr() % 256 == 0
    assert bool((a == 1).all()) and bool((b == 2).all())
    arena.pin()
    assert fake.calls == 1 and fake.pinned_nbytes == 4096 + PAGE_NBYTES * 2  # 1000 -> 4096 + 5000
    assert arena.logical_nbytes == 6000 and arena.pinned_nbytes == fake.pinned_nbytes
    with pytest.raises(RuntimeError):
        arena.take(10)
    arena.close()
    assert fake.ranges == {}
    assert bool((b == 2).all())  # a view outliving the arena is still valid (pageable) memory


def test_taking_past_the_reservation_maps_another_region():
    fake = FakeRegistrar()
    arena = HostArena(8192, fake)
    first, second = arena.take(8000), arena.take(8000)
    arena.pin()
    assert fake.calls == 2 and fake.pinned_nbytes == 2 * 8192
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    arena.close()


def test_a_dropped_arena_unregisters_its_ranges():
    fake = FakeRegistrar()
    arena = HostArena(1 << 16, fake)
    arena.take(100)
    arena.pin()
    del arena
    gc.collect()
    assert fake.ranges == {}


def test_no_registrar_pins_nothing():
    arena = HostArena(1 << 16)
    arena.take(100)
    arena.pin()
    assert arena.pinned_nbytes == 0
    assert memory.default_registrar(torch.device("cpu")) is None
    assert isinstance(memory.default_registrar(torch.device("cuda", 1)), memory.CudaHostRegistrar)


def _w1_like_engine(monkeypatch, fake):
    """W1's placement (every block in host RAM, KV offloaded) on a tiny OPT, pinning through ``fake``."""
    from pipo.engine import Engine, EngineOptions

    monkeypatch.setattr(memory, "default_registrar", lambda device: fake)
    source = RandomModel(SHAPES["tiny-opt"], seed=0)
    return Engine(source, EngineOptions(placement="host", kv_offload=True, micro_batch=2,
                                        dtype="float16"))


def _logical_nbytes(engine) -> int:
    weights = sum(layout.nbytes for layout in engine._weights.layouts.values())
    return weights + engine._kv.nbytes()


def test_w1_plan_pins_at_most_5_percent_over_its_data_and_close_releases_it(monkeypatch):
    fake = FakeRegistrar()
    engine = _w1_like_engine(monkeypatch, fake)
    engine.generate_ids([[5, 6, 7, 8] * 16] * 4, 4)
    logical = _logical_nbytes(engine)
    assert fake.calls == 2  # one range for the weights, one for the KV cache
    assert logical <= fake.pinned_nbytes <= 1.05 * logical
    assert engine._weights.pinned_nbytes + engine._kv.pinned_nbytes == fake.pinned_nbytes
    row = metrics.pinned_memory(engine.device)  # what a bench row reports
    assert row["pinned_nbytes"] == fake.pinned_nbytes and row["host_data_nbytes"] >= logical
    engine.close()
    assert fake.ranges == {} and metrics.pinned_memory(engine.device)["pinned_nbytes"] == 0


def test_a_new_generation_releases_the_previous_kv_cache(monkeypatch):
    fake = FakeRegistrar()
    engine = _w1_like_engine(monkeypatch, fake)
    try:
        engine.generate_ids([[5, 6, 7]] * 4, 2)
        engine.generate_ids([[5, 6, 7, 8, 9]] * 4, 3)
        assert fake.calls == 3 and len(fake.ranges) == 2  # weights kept, first KV cache released
        assert engine._weights.pinned_nbytes + engine._kv.pinned_nbytes == fake.pinned_nbytes
    finally:
        engine.close()
    assert fake.ranges == {}
