"""Int4 weights on a GPU: kernels compile when weights are placed, not in the first compute task."""

from __future__ import annotations

import torch

from pipo.bench.random_model import RandomModel
from pipo.bench.workloads import SHAPES
from pipo.engine.weights import PlacedWeights
from pipo.ops import int4_dispatch
from pipo.plan import estimate_block_nbytes, fixed_plan

SPEC = SHAPES["tiny-llama"]
CPU = torch.device("cpu")


def _place(monkeypatch, int4_group, tier="host"):
    calls = []
    monkeypatch.setattr(int4_dispatch, "prepare_kernels", lambda device, dtype: calls.append((device, dtype)))
    source = RandomModel(SPEC, seed=0, int4_group=int4_group)
    plan = fixed_plan(SPEC, estimate_block_nbytes(SPEC, 4, int4_group), tier, batch=1, max_len=8)
    weights = PlacedWeights(source, plan, device=CPU, dtype=torch.float32, int4_group=int4_group)
    return weights, calls


def test_placing_int4_weights_requests_the_kernels_once(monkeypatch):
    for tier in ("host", "resident"):
        weights, calls = _place(monkeypatch, 32, tier)
        assert calls == [(CPU, torch.float32)] and weights.holds_int4


def test_placing_dense_weights_requests_no_kernels(monkeypatch):
    weights, calls = _place(monkeypatch, None)
    assert calls == [] and not weights.holds_int4


def test_prepare_kernels_compiles_gemv_and_dequantize_on_cuda_only(monkeypatch):
    from pipo.ops.kernels import dequant_int4, gemv_int4

    compiled = []
    monkeypatch.setattr(gemv_int4, "prepare", lambda dtype: compiled.append(("gemv", dtype)))
    monkeypatch.setattr(dequant_int4, "prepare", lambda dtype: compiled.append(("dequant", dtype)))
    int4_dispatch.prepare_kernels(CPU, torch.float16)
    assert compiled == []
    int4_dispatch.prepare_kernels(torch.device("cuda"), torch.float16)
    assert compiled == [("gemv", torch.float16), ("dequant", torch.float16)]


def test_block_makes_the_engines_workspace_current(monkeypatch):
    weights, _ = _place(monkeypatch, 32, "resident")
    weights.int4_workspace = int4_dispatch.Int4Workspace()  # as on CUDA
    tensors = weights.block("L0.attn", None)
    assert int4_dispatch.current_workspace() is weights.int4_workspace
    weights.close()
    assert weights.int4_workspace._block is None and tensors
