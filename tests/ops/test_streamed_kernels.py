"""Products on weights streamed to the CPU 4-bit path, read as stored (no repack per load):
the numba Q8_0 kernel (``q8_linear``) and ``StoredInt4``, against float64 references on odd shapes."""

from __future__ import annotations

import pytest
import torch

from pipo.engine.blocks import pack, views
from pipo.io.q8 import Q8Tensor, q8_linear
from pipo.ops import quant
from pipo.ops.int4pack import StoredInt4, stored_int4
from pipo.ops.linear import linear

BF16_EPS = 2.0 ** -8


def _q8(out_f: int, in_f: int, seed: int) -> Q8Tensor:
    torch.manual_seed(seed)
    codes = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8)
    d = (torch.rand(out_f, in_f // 32) * 0.05 + 1e-3).to(torch.float16)
    return Q8Tensor(codes, d, (out_f, in_f))


def _within(y: torch.Tensor, x64: torch.Tensor, w64: torch.Tensor, rel: float) -> None:
    """``y`` == x64 @ w64.T up to ``rel`` of the output plus fp32 accumulation of |x| |w|."""
    ref = x64 @ w64.T
    bound = rel * ref.abs() + 1e-5 * (x64.abs() @ w64.abs().T) + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("out_f,in_f,rows", [(1, 32, 1), (37, 96, 3), (130, 576, 1), (65, 64, 17)])
def test_q8_linear_matches_float64_reference(out_f, in_f, rows):
    q8 = _q8(out_f, in_f, out_f + in_f)
    x = torch.randn(2, rows, in_f)
    y = q8_linear(x, q8)  # fp32 in, fp32 out
    assert y.shape == (2, rows, out_f) and y.dtype == torch.float32
    _within(y.reshape(-1, out_f), x.reshape(-1, in_f).double(), q8.dequantize().double(), 0.0)


def test_linear_dispatches_a_q8_head_and_keeps_the_activation_dtype():
    q8 = _q8(48, 64, 5)
    x = torch.randn(3, 64).bfloat16()
    y = linear(x, q8)
    assert y.dtype == torch.bfloat16
    _within(y, x.double(), q8.dequantize().double(), BF16_EPS)
    with pytest.raises(ValueError, match="features"):
        q8_linear(torch.randn(1, 63), q8)


@pytest.mark.parametrize("out_f,in_f,group,rows", [(5, 32, 32, 1), (33, 96, 32, 3), (48, 100, 64, 2)])
def test_stored_int4_multiplies_bf16_activations_like_the_packed_path(out_f, in_f, group, rows):
    torch.manual_seed(out_f * 7 + in_f)
    q = quant.quantize(torch.randn(out_f, in_f) + 0.3, group)
    s = stored_int4(q)
    assert isinstance(s, StoredInt4) and s.qweight is q.qweight  # a view: nothing copied
    x = torch.randn(rows, in_f)  # an fp32 residual stream's norm output
    y = linear(x, s)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_f)
    _within(y, x.bfloat16().double(), quant.dequantize(q).double(), BF16_EPS)


def test_stored_int4_survives_a_slot_round_trip():
    s = stored_int4(quant.quantize(torch.randn(16, 64), 32))
    buffer, layout = pack({"wq": s})
    back = views(buffer, layout)["wq"]
    assert type(back) is StoredInt4 and torch.equal(back.qweight, s.qweight)
