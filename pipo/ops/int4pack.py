"""4-bit matrix products on the CPU with torch's own int4 weight-only kernels (``int4pack``).

``torch._convert_weight_to_int4pack_for_cpu`` repacks 4-bit codes ``[N, K]`` into the layout of
``torch._weight_int4pack_mm_for_cpu(x_bf16 [M, K], packed, group_size, scales_and_zeros)``, an
AVX-512 / AVX2 kernel that reads the packed nibbles once per call: at batch 1 it runs at memory speed.

torch's convention (``aten/src/ATen/native/cpu/int4mm_kernel.cpp``): ``scales_and_zeros`` is bf16
``[K / group, N, 2]`` and a code ``c`` (0..15) stands for ``(c - 8) * scale + zero``, evaluated in fp32
from the bf16 scale and zero. pipo's :class:`~pipo.ops.quant.QuantTensor` means ``c * scale + min``,
so ``zero = min + 8 * scale``. The codes are kept as they are; only the fp16 scale and the zero are
rounded to bf16 (8 significant bits: a relative error <= 2^-9 per group, next to a 4-bit step of
1/15 of the range), activations are fed in bf16 and products come back in bf16, accumulated in fp32.

:class:`PackedInt4` is that layout: made once when a block is placed (:func:`pack_quant`,
:func:`pack_q8`), then every call is one kernel call. A GGUF Q8_0 matrix (an LM head) is packed
exactly as two 4-bit halves side by side along K: ``q8 = 16 * hi + lo`` with ``hi = q8 >> 4`` in
-8..7 (code ``hi + 8``, scale ``16 d``, zero 0) and ``lo = q8 & 15`` (code ``lo``, scale ``d``, zero
``8 d``); the activations are fed twice (``[x, x]``), so one kernel call multiplies the 8-bit head.

Shapes the kernel needs: ``N % 16 == 0`` (rows are padded with zero-valued codes at pack time and the
padding columns of the product are sliced off) and ``K % group == 0`` (a group that does not divide
``in`` is re-expressed as groups of 32 when possible: the same values, exactly; otherwise the
activations are zero-padded per call, which no real model's shapes need).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from pipo.ops.quant import PartsRecord, QuantTensor, unpack_int4

N_MULTIPLE = 16  # the packing kernel's row multiple
KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel supports
ZERO_OFFSET = 8  # torch's kernel computes (code - 8) * scale + zero
COMPUTE_DTYPE = torch.bfloat16  # the activation dtype of torch's vectorized CPU int4 kernel


@dataclass(frozen=True, slots=True, eq=False)
class PackedInt4(PartsRecord):
    """A weight ``[out, in]`` in torch's CPU int4pack layout (see the module doc).

    ``packed`` uint8 ``[n_padded, k / 2]``; ``scales_zeros`` bf16 ``[k / group_size, n_padded, 2]``;
    ``k`` is the kernel's inner size: ``in``, or ``in`` padded to a whole group.
    """

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    shape: tuple[int, int]
    group_size: int

    tensor_fields: ClassVar[tuple[str, ...]] = ("packed", "scales_zeros")

    @property
    def k(self) -> int:
        """The kernel's inner size (a whole number of groups)."""
        return self.packed.shape[1] * 2

    repeats: ClassVar[int] = 1  # copies of the activations the kernel's K holds

    @property
    def device(self) -> torch.device:
        """Where the tensors live."""
        return self.packed.device


@dataclass(frozen=True, slots=True, eq=False)
class PackedQ8(PackedInt4):
    """A Q8_0 matrix ``[out, in]`` as two 4-bit halves side by side: ``k = 2 in``, fed ``[x, x]``."""

    repeats: ClassVar[int] = 2


@dataclass(frozen=True, slots=True, eq=False)
class StoredInt4(QuantTensor):
    """An int4 matrix of a block streamed to the CPU 4-bit path, kept in the stored
    :class:`~pipo.ops.quant.QuantTensor` layout (a view of the weight slot; no repack per load) and
    multiplied by the numba kernel of ``int4_linear``. Activations are cast to bf16 first, so the
    product has the dtype and the rounding of the activations that :func:`packed_linear` has."""

    compute_dtype: ClassVar[torch.dtype | None] = COMPUTE_DTYPE


def stored_int4(q: QuantTensor) -> StoredInt4:
    """``q`` as a :class:`StoredInt4`: the same tensors (views), nothing copied."""
    return StoredInt4.from_parts(q.to_parts(), q.shape, q.group_size)


def _pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, shape: tuple[int, int],
          group_size: int, kind: type = PackedInt4) -> PackedInt4:
    """Codes int ``[N, K]`` (0..15) and fp32 ``scales`` / ``zeros`` ``[N, K / group]`` -> PackedInt4."""
    n = codes.shape[0]
    pad = -n % N_MULTIPLE
    if pad:  # zero-valued rows: code 8 with scale 0 and zero 0
        codes = F.pad(codes, (0, 0, 0, pad), value=ZERO_OFFSET)
        scales, zeros = F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    scales_zeros = torch.stack([scales, zeros], dim=-1).to(COMPUTE_DTYPE)  # [n_padded, G, 2]
    return kind(packed, scales_zeros.transpose(0, 1).contiguous(), shape, group_size)  # [G, n_padded, 2]


def _kernel_group(q: QuantTensor) -> int:
    """The group size to pack ``q`` with: its own, or 32 when its groups do not divide ``in``."""
    in_f = q.shape[1]
    if in_f % q.group_size == 0 and q.group_size in KERNEL_GROUPS:
        return q.group_size
    return 32 if in_f % 32 == 0 and q.group_size % 32 == 0 else q.group_size


def pack_quant(q: QuantTensor) -> PackedInt4:
    """``q`` in torch's CPU layout: the same codes; ``zero = min + 8 * scale`` (fp32, then bf16)."""
    if q.group_size not in KERNEL_GROUPS and q.group_size % 32:
        raise ValueError(f"int4pack needs groups of 32, 64, 128 or 256, got {q.group_size}")
    group = _kernel_group(q)
    split = q.group_size // group  # 1, or sub-groups of 32 sharing their group's scale and min
    in_f = q.shape[1]
    k = in_f if group != q.group_size else q.in_padded
    codes = unpack_int4(q.qweight)[:, :k]  # uint8 [N, k]
    scales = q.scales.float().repeat_interleave(split, dim=1)[:, :k // group]  # [N, k / group]
    mins = q.mins.float().repeat_interleave(split, dim=1)[:, :k // group]
    return _pack(codes, scales, mins + ZERO_OFFSET * scales, q.shape, group)


def pack_q8(q8) -> PackedQ8:
    """A :class:`~pipo.io.q8.Q8Tensor` as two exact 4-bit halves along K (see the module doc)."""
    codes = q8.codes  # int8 [N, K] in -128..127; the halves are made in int8, one int32 copy
    hi, lo = (codes >> 4) + ZERO_OFFSET, codes & 15  # q8 = 16 * (hi - 8) + lo; both in 0..15
    d = q8.scales.float()  # [N, K / 32]
    both = torch.cat([hi, lo], dim=1)  # int8 [N, 2K]
    scales = torch.cat([16 * d, d], dim=1)  # [N, 2K / 32]
    zeros = torch.cat([torch.zeros_like(d), ZERO_OFFSET * d], dim=1)
    return _pack(both, scales, zeros, q8.shape, q8.group_size, PackedQ8)


def packed_linear(x: torch.Tensor, p: PackedInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] @ W^T + bias -> [..., out]`` in bf16 (the kernel's output; fp32 accumulation).

    Feed bf16 activations: any other dtype is cast first (one more op). The product stays bf16
    whatever ``x``'s dtype, so an fp32 residual stream pays one cast per block, not two per matrix.
    """
    out_f, in_f = p.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"packed_linear: x has {x.shape[-1]} features, weight expects {in_f}")
    x2 = x.reshape(-1, in_f)  # [rows, in]
    if x2.dtype != COMPUTE_DTYPE:
        x2 = x2.to(COMPUTE_DTYPE)
    if p.repeats == 2:
        x2 = torch.cat([x2, x2], dim=1)  # [rows, 2 in]: the hi and lo halves of a Q8 matrix
    elif p.k != in_f:
        x2 = F.pad(x2, (0, p.k - in_f))  # [rows, k]: only for in not a multiple of 32
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch._weight_int4pack_mm_for_cpu(x2, p.packed, p.group_size, p.scales_zeros)
    if y.shape[1] != out_f:
        y = y[:, :out_f]  # [rows, out]: drop the padding rows of the weight
    if bias is not None:
        y = y + bias.to(COMPUTE_DTYPE)
    return y.view(*x.shape[:-1], out_f)  # [..., out] bf16
