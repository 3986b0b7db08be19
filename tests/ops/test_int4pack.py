"""torch's CPU int4pack kernel through pipo.ops.int4pack, against float64 references on odd shapes.

Two checks per case: (1) the packed matrix means what the QuantTensor / Q8Tensor means, up to bf16
rounding of scales and zeros (a wrong zero-point convention would be off by 8 steps); (2) the product
equals the float64 product of the bf16 activations and the packed matrix, up to bf16 output rounding.
"""

from __future__ import annotations

import pytest
import torch

from pipo.io.q8 import Q8Tensor
from pipo.ops import int4pack, quant
from pipo.ops.int4pack import PackedQ8, pack_q8, pack_quant, packed_linear

BF16_EPS = 2.0 ** -8  # relative rounding of a bf16 value


def _kernel_matrix(q: quant.QuantTensor) -> torch.Tensor:
    """float64 ``[out, in]`` the kernel computes with: ``(c - 8) * bf16(s) + bf16(min + 8 s)``."""
    out_f, in_f = q.shape
    codes = quant.unpack_int4(q.qweight).double().view(out_f, q.n_groups, q.group_size)
    s = q.scales.float()
    z = (q.mins.float() + 8 * s).bfloat16().double()
    w = (codes - 8) * s.bfloat16().double()[..., None] + z[..., None]
    return w.view(out_f, -1)[:, :in_f]


def _check_product(y: torch.Tensor, x: torch.Tensor, w64: torch.Tensor) -> None:
    """``y`` == bf16(x) @ w64.T up to bf16 output rounding and fp32 accumulation."""
    xb = x.bfloat16().double()
    ref = xb @ w64.T  # [rows, out]
    bound = BF16_EPS * ref.abs() + 1e-5 * (xb.abs() @ w64.abs().T) + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("out_f,in_f,group,rows", [
    (5, 32, 32, 1), (33, 96, 32, 3), (48, 100, 64, 2), (17, 96, 128, 5), (16, 256, 128, 9),
    (3, 7, 32, 1), (40, 192, 64, 17)])
def test_packed_int4_matches_float64_reference(out_f, in_f, group, rows):
    torch.manual_seed(out_f * 1000 + in_f)
    w = torch.randn(out_f, in_f) * torch.linspace(0.05, 2.0, out_f)[:, None] + 0.3
    q = quant.quantize(w, group)
    p = pack_quant(q)
    exact = quant.dequantize(q).double()  # what the QuantTensor means
    kernel_w = _kernel_matrix(q)
    s = q.scales.float().repeat_interleave(group, 1)[:, :in_f].double()
    m = q.mins.float().abs().repeat_interleave(group, 1)[:, :in_f].double()
    assert bool(((kernel_w - exact).abs() <= 2.0 ** -8 * (15 * s + m) + 1e-12).all())
    x = torch.randn(2, rows, in_f)
    y = packed_linear(x.bfloat16(), p)
    assert y.shape == (2, rows, out_f) and y.dtype == torch.bfloat16
    _check_product(y.reshape(-1, out_f), x.reshape(-1, in_f), kernel_w)


def test_identity_codes_recover_the_zero_point_convention():
    """A matrix whose value is exactly min (code 0) and min + 15 * scale (code 15): catches an off-by-8."""
    out_f, in_f = 16, 64
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    codes[:, 1::2] = 15
    scales = torch.full((out_f, 2), 0.5, dtype=torch.float16)
    mins = torch.full((out_f, 2), -2.0, dtype=torch.float16)
    q = quant.QuantTensor(quant.pack_int4(codes), scales, mins, (out_f, in_f), 32)
    x = torch.zeros(1, in_f)
    x[0, 0], x[0, 1] = 1.0, 1.0  # picks w[:, 0] = -2 and w[:, 1] = 5.5
    y = packed_linear(x.bfloat16(), pack_quant(q))
    assert torch.equal(y.float(), torch.full((1, out_f), 3.5))


def test_gguf_q4_0_blocks_pack_with_zero_zero_point():
    torch.manual_seed(1)
    d = (torch.rand(24, 3) * 0.1).to(torch.float16)
    codes = torch.randint(0, 16, (24, 96), dtype=torch.uint8)
    q = quant.QuantTensor(quant.pack_int4(codes), d, d * -8.0, (24, 96), 32)  # from_gguf_q4_0's form
    p = pack_quant(q)
    assert bool((p.scales_zeros[..., 1] == 0).all())  # zero = -8 d + 8 d, exactly
    x = torch.randn(4, 96)
    _check_product(packed_linear(x.bfloat16(), p), x, _kernel_matrix(q))


@pytest.mark.parametrize("out_f,in_f,rows", [(16, 32, 1), (37, 96, 3), (64, 576, 8)])
def test_q8_as_two_exact_halves(out_f, in_f, rows):
    torch.manual_seed(out_f + in_f)
    codes = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8)
    d = (torch.rand(out_f, in_f // 32) * 0.02 + 1e-3).bfloat16().to(torch.float16)  # bf16-exact scales
    q8 = Q8Tensor(codes, d, (out_f, in_f))
    p = pack_q8(q8)
    assert isinstance(p, PackedQ8) and p.k == 2 * in_f
    x = torch.randn(rows, in_f)
    y = packed_linear(x, p)  # fp32 in (cast inside), bf16 out
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_f)
    _check_product(y, x, q8.dequantize().double())  # scales exact in bf16: the very Q8 values


def test_q8_general_scales_round_only_the_scale():
    torch.manual_seed(3)
    codes = torch.randint(-128, 128, (32, 64), dtype=torch.int8)
    d = (torch.rand(32, 2) * 0.05 + 1e-3).to(torch.float16)
    q8 = Q8Tensor(codes, d, (32, 64))
    x = torch.randn(2, 64)
    w_bf16_scale = (codes.double().view(32, 2, 32) * d.bfloat16().double()[..., None]).view(32, 64)
    _check_product(packed_linear(x, pack_q8(q8)), x, w_bf16_scale)


def test_parts_round_trip_keeps_the_kind():
    q8 = Q8Tensor(torch.ones(16, 32, dtype=torch.int8), torch.ones(16, 1, dtype=torch.float16), (16, 32))
    p = pack_q8(q8)
    back = type(p).from_parts(p.to_parts(), p.shape, p.group_size)
    assert isinstance(back, PackedQ8) and back.repeats == 2 and back.nbytes == p.nbytes


def test_bad_width_is_refused():
    p = pack_quant(quant.quantize(torch.randn(16, 64), 32))
    with pytest.raises(ValueError, match="features"):
        packed_linear(torch.randn(1, 63), p)
    assert int4pack.COMPUTE_DTYPE == torch.bfloat16
