"""The offloaded KV cache: LoadKV / SaveKV are single copies into position-major slots.

Loads used to allocate a new staging tensor (growing with the cache) and transpose it on the device
at every call; now they copy straight into a preallocated slot and allocate nothing.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from pipo.bench.workloads import SHAPES
from pipo.engine.kv import KVCache
from pipo.plan import estimate_block_nbytes, fixed_plan

SPEC = SHAPES["tiny-llama"]  # 2 layers, 2 KV heads of 16


def _cache(batch=5, micro_batch=2, max_len=12) -> KVCache:
    plan = fixed_plan(SPEC, estimate_block_nbytes(SPEC, 4), "host", batch=batch, max_len=max_len,
                      micro_batch=micro_batch, kv_offload=True)
    return KVCache(SPEC, plan, device=torch.device("cpu"), dtype=torch.float32)


def _fill_home(kv: KVCache) -> None:
    gen = torch.Generator().manual_seed(0)
    for pair in kv.home.values():
        for t in pair:
            t.copy_(torch.randn(t.shape, generator=gen))


def _allocations(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "[memory]")  # an allocation or its free


def test_load_gives_attention_the_cached_prefix_in_its_layout():
    kv = _cache()
    _fill_home(kv)
    for micro, rows in ((0, 2), (2, 1)):  # a full micro-batch and the short last one
        kv.load(1, micro, slot=1, start=7)
        k, v = kv.for_compute(1, micro, slot=1)
        home_k, home_v = kv.home[(1, micro)]
        assert k.shape == (rows, SPEC.n_kv_heads, 12 + 1, SPEC.head_dim)  # + the trash slot
        assert torch.equal(k[:, :, :7], home_k[:7].permute(1, 2, 0, 3))
        assert torch.equal(v[:, :, :7], home_v[:7].permute(1, 2, 0, 3))


def test_save_writes_back_exactly_the_new_entries():
    kv = _cache()
    kv.load(0, 1, slot=0, start=3)
    k, v = kv.for_compute(0, 1, slot=0)
    k[:, :, 3:5] = 1.5  # what attention appends for two new positions
    v[:, :, 3:5] = -2.0
    kv.save(0, 1, slot=0, start=3, t=2)
    home_k, home_v = kv.home[(0, 1)]
    assert bool((home_k[3:5] == 1.5).all()) and bool((home_v[3:5] == -2.0).all())
    assert bool((home_k[5:] == 0).all()) and bool((home_k[:3] == 0).all())


def test_repeated_loads_and_saves_allocate_nothing():
    kv = _cache(max_len=64)
    _fill_home(kv)
    slot_ptrs = [t.data_ptr() for t in kv.for_compute(0, 0, slot=0)]

    def steps():
        for start in range(10, 40, 3):  # a growing cache, as decode steps see it
            kv.load(0, 0, slot=0, start=start)
            kv.save(0, 0, slot=0, start=start, t=1)

    assert _allocations(steps) == 0
    assert [t.data_ptr() for t in kv.for_compute(0, 0, slot=0)] == slot_ptrs
