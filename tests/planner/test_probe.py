"""The probe: the disk lane timed through the engine's own block reads (fixed + bytes / bandwidth),
compute timed on weights out of the cache."""

from __future__ import annotations

import pytest

from pipo.io.spec import ModelSpec
from pipo.io.store_read import OffloadStore
from pipo.planner import probe_disk
from pipo.planner.costs import task_durations
from pipo.planner.profile import nominal_profile
from pipo.plan import fixed_plan, estimate_block_nbytes
from pipo.runtime.tasks import ReadBlock

TINY = ModelSpec("llama", vocab_size=64, hidden=64, n_layers=2, n_heads=2, n_kv_heads=1,
                 head_dim=32, ffn=128, max_positions=32)


def test_the_fit_recovers_a_fixed_cost_and_a_bandwidth():
    sizes = [2**20, 4 * 2**20, 16 * 2**20]
    seconds = [3e-4 + n / 1.2e9 for n in sizes]
    fixed_s, bps = probe_disk.fit_block_reads(sizes, seconds)
    assert fixed_s == pytest.approx(3e-4, rel=1e-6) and bps == pytest.approx(1.2e9, rel=1e-6)


def test_times_without_a_size_trend_are_charged_per_byte():
    fixed_s, bps = probe_disk.fit_block_reads([2**20, 2**22], [2e-3, 1e-3])
    assert fixed_s >= 0 and bps > 0


def test_the_probe_reads_through_the_engines_read_path(tmp_path, monkeypatch):
    from pipo.engine.weights import DISK_CHUNK_NBYTES, DISK_DEPTH

    calls = []
    real = OffloadStore.read_block_into

    async def spy(self, block, buffer, *, chunk_nbytes, depth):
        calls.append((block, chunk_nbytes, depth))
        return await real(self, block, buffer, chunk_nbytes=chunk_nbytes, depth=depth)

    monkeypatch.setattr(OffloadStore, "read_block_into", spy)
    fixed_s, bps = probe_disk.disk_read_cost(str(tmp_path), TINY)
    assert fixed_s >= 0 and bps > 0
    n_blocks = len(TINY.block_names())
    assert len(calls) == n_blocks  # each block read once: no reread served by a cache
    assert {(c, d) for _, c, d in calls} == {(DISK_CHUNK_NBYTES, DISK_DEPTH)}
    assert list(tmp_path.iterdir()) == []  # the scratch store is removed


def test_a_disk_read_costs_the_fixed_part_plus_bytes_over_bandwidth():
    from dataclasses import replace

    profile = replace(nominal_profile(), disk_read_bps=1e9, disk_block_s=5e-4)
    sizes = estimate_block_nbytes(TINY, 4)
    plan = fixed_plan(TINY, sizes, "disk", batch=1, max_len=8)
    duration = task_durations(TINY, plan, profile, start=4, t=1, dtype_nbytes=4)
    got = duration(ReadBlock("L0.mlp", 0))
    assert got == pytest.approx(5e-4 + sizes["L0.mlp"] / 1e9 + profile.task_overhead_s)


def test_compute_is_timed_on_copies_that_exceed_the_cache():
    import torch

    from pipo.planner.probe import cache_nbytes, weight_copies

    assert cache_nbytes(torch.device("cpu")) > 0
    w = {"w": torch.ones(256, 256), "eps": 1e-5}
    copies = weight_copies(w, 10 * 256 * 256 * 4 + 1)
    assert len(copies) == 11 and copies[0] is w
    assert all(c["w"].data_ptr() != w["w"].data_ptr() for c in copies[1:])
    assert all(torch.equal(c["w"], w["w"]) and c["eps"] == 1e-5 for c in copies)


def test_products_of_three_rows_or_more_pay_the_matrix_matrix_term():
    from pipo.planner.costs import GEMM_MIN_ROWS, compute_features

    spec = TINY
    bytes_of = estimate_block_nbytes(spec, 4)["L0.mlp"]
    few = compute_features(spec, "mlp", GEMM_MIN_ROWS - 1, 1, 8, 4, None)
    more = compute_features(spec, "mlp", GEMM_MIN_ROWS, 1, 8, 4, None)
    assert few[-1] == 0.0 and more[-1] == bytes_of
    assert compute_features(spec, "head", 1, 64, 64, 4, None)[-1] == 0.0  # one row's last token


def test_mlp_and_head_are_timed_at_every_row_count():
    from pipo.planner.probe import POINTS, _points

    rows_tokens = {(b, t) for b, t, _ in POINTS}
    assert {(b, t) for b, t, _ in _points("mlp")} == rows_tokens == {
        (b, t) for b, t, _ in _points("head")}
    assert len(_points("mlp")) == len(rows_tokens) and _points("attn") == list(POINTS)


def test_later_micro_batches_of_a_cached_block_compute_at_the_hot_fit():
    from dataclasses import replace

    from pipo.planner.profile import ComputeFit, Profile
    from pipo.runtime.tasks import Compute

    cold = ComputeFit(1e-3, 0.0, 0.0, 0.0, 0.0, 0.0)
    hot = ComputeFit(1e-4, 0.0, 0.0, 0.0, 0.0, 0.0)
    sizes = estimate_block_nbytes(TINY, 4)
    plan = fixed_plan(TINY, sizes, "resident", batch=4, max_len=8, micro_batch=2)

    def seconds(cache_nbytes: int, micro: int) -> float:
        profile = replace(nominal_profile(), compute=cold, compute_hot=hot,
                          cache_nbytes=cache_nbytes, task_overhead_s=0.0)
        duration = task_durations(TINY, plan, profile, start=4, t=1, dtype_nbytes=4)
        return duration(Compute("L0.mlp", micro, None))

    ops = 3  # an MLP block's matrix products
    assert seconds(2**30, 0) == pytest.approx(ops * 1e-3)  # the first reads from memory
    assert seconds(2**30, 1) == pytest.approx(ops * 1e-4)  # the next finds the block cached
    assert seconds(sizes["L0.mlp"] - 1, 1) == pytest.approx(ops * 1e-3)  # too big to stay
    doc = replace(nominal_profile(), compute_hot=hot, cache_nbytes=7).to_json()
    import json

    back = Profile.from_dict(json.loads(doc))
    assert back.compute_hot == hot and back.cache_nbytes == 7


def test_an_embedding_read_by_rows_costs_its_rows_not_its_table():
    from dataclasses import replace

    from pipo.runtime.tasks import Compute

    profile = replace(nominal_profile(), disk_read_bps=1e9, disk_block_s=5e-4)
    sizes = estimate_block_nbytes(TINY, 4)
    plan = fixed_plan(TINY, sizes, "disk", batch=2, max_len=8)
    whole = task_durations(TINY, plan, profile, start=4, t=3, dtype_nbytes=4)
    rows = task_durations(TINY, plan, profile, start=4, t=3, dtype_nbytes=4, embed_rows=True)
    assert rows(ReadBlock("embed", 0)) == pytest.approx(profile.task_overhead_s)
    assert whole(ReadBlock("embed", 0)) > rows(ReadBlock("embed", 0))
    row_read_s = 2 * 3 * TINY.hidden * 4 / 1e9  # 2 rows x 3 new tokens, fp32 rows
    assert rows(Compute("embed", 0)) == pytest.approx(whole(Compute("embed", 0)) + row_read_s)
    assert rows(ReadBlock("L0.mlp", 0)) == whole(ReadBlock("L0.mlp", 0))


def test_every_task_of_a_disk_step_with_offloaded_kv_is_costed_with_embedding_rows():
    from graphs import DECODE
    from pipo.planner.estimate import predict_step

    sizes = estimate_block_nbytes(TINY, 4)
    plan = fixed_plan(TINY, sizes, "disk", batch=2, max_len=8, kv_offload=True)
    whole = predict_step(TINY, plan, nominal_profile(), DECODE, start=4, t=1, dtype_nbytes=4)
    rows = predict_step(TINY, plan, nominal_profile(), DECODE, start=4, t=1, dtype_nbytes=4,
                        embed_rows=True)
    assert 0 < rows.step_s <= whole.step_s  # the embedding's read may hide behind the host work
    table_s = sizes["embed"] / nominal_profile().disk_read_bps
    assert rows.busy_s["disk"] == pytest.approx(whole.busy_s["disk"] - table_s
                                                - nominal_profile().disk_block_s)


def test_a_stores_own_blocks_give_its_disk_cost_once_per_file(tmp_path, monkeypatch):
    from pipo.bench.random_model import RandomModel
    from pipo.io.store import convert

    path = convert(RandomModel(TINY), tmp_path / "store", weights="fp32")
    read = []
    real = OffloadStore.read_block_into

    async def spy(self, block, buffer, *, chunk_nbytes, depth):
        read.append(block)
        return await real(self, block, buffer, chunk_nbytes=chunk_nbytes, depth=depth)

    monkeypatch.setattr(OffloadStore, "read_block_into", spy)
    with OffloadStore(path) as store:
        profile = probe_disk.with_store_reads(nominal_profile(), store)
        again = probe_disk.with_store_reads(nominal_profile(), store)
    assert profile.disk_read_bps > 0 and profile.disk_block_s >= 0
    assert (again.disk_read_bps, again.disk_block_s) == (profile.disk_read_bps, profile.disk_block_s)
    assert sorted(read) == sorted(b for b in TINY.block_names() if b != "embed")  # once, no embed
