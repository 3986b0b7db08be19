"""Group-wise asymmetric int4 weights: the :class:`QuantTensor` format, quantization, GGUF import.

Format (one linear weight ``W [out, in]``, groups of ``group_size`` along ``in``):

- ``qweight``: int32 ``[out, in_padded // 8]``; code ``k`` of row ``n`` sits in bits ``4*(k % 8)``
  of word ``k // 8``. Little-endian, so the same bytes seen as uint8 ``[out, in_padded // 2]`` hold
  code ``2j`` in the low and ``2j + 1`` in the high nibble of byte ``j``. One row is contiguous, so a
  warp reading consecutive words of a row is one coalesced 128-byte transaction.
- ``scales``: fp16 ``[out, n_groups]``;  ``mins``: fp16 ``[out, n_groups]``.
- ``in_padded = n_groups * group_size``; the padding codes are zero and are never read by the math.
- Value: ``w = q * scale + min``, evaluated in fp32. The product of a 4-bit code and an fp16 scale is
  exact in fp32, so the only rounding is the final add — the same single rounding as GGUF's
  ``d * q + m``. Hence Q4_1 (``scale = d, min = m``) imports bit-exactly, and Q4_0 (``(q - 8) * d``)
  imports exactly with ``min = -8 * d`` (exact in fp16: a power-of-two scaling). Storing a min rather
  than an integer zero point is what makes both lossless; :func:`quantize` uses the group minimum.

Every tensor field has rows = output features on dim 0, so permuting rows is indexing dim 0 of each
field (``dataclasses.replace(q, **{f: getattr(q, f)[rows] for f in q.tensor_fields})``).

Math entry points: :func:`int4_linear` (CPU numba kernel, torch fallback elsewhere) and, for any
device, ``pipo.ops.int4_dispatch.int4_matmul``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

CODE_MAX = 15  # largest 4-bit code
CODES_PER_WORD = 8  # nibbles per int32 word of ``qweight``
GGUF_BLOCK = 32  # elements per Q4_0 / Q4_1 block
INT4_GROUP_SIZES = (32, 64, 128)  # the group sizes users may choose for quantize()
CPU_DOT_MAX_ROWS = 16  # above this many activation rows the CPU path dequantizes and calls sgemm

_CPU_KERNEL_LOCK = threading.Lock()  # numba's workqueue threading layer must not be entered twice


class PartsRecord:
    """What quantized weight records share: named tensor fields (``tensor_fields``) that are stored
    and moved as parts, a logical ``shape`` and a ``group_size``."""

    __slots__ = ()
    tensor_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensor fields (what a copy of this weight moves)."""
        return sum(t.numel() * t.element_size() for t in self.to_parts().values())

    def to_parts(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name, in ``tensor_fields`` order (for serialization)."""
        return {name: getattr(self, name) for name in self.tensor_fields}

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor], shape: tuple[int, ...], group_size: int):
        """Rebuild a record from :meth:`to_parts` output (views are kept, nothing is copied)."""
        return cls(**{name: parts[name] for name in cls.tensor_fields},
                   shape=(int(shape[0]), int(shape[1])), group_size=int(group_size))

    def to(self, device: str | torch.device, non_blocking: bool = False):
        """A new record of the same kind with every tensor field on ``device``."""
        moved = {n: t.to(device, non_blocking=non_blocking) for n, t in self.to_parts().items()}
        return type(self).from_parts(moved, self.shape, self.group_size)


@dataclass(frozen=True, slots=True, eq=False)
class QuantTensor(PartsRecord):
    """An int4 weight ``[out, in]``: packed codes, fp16 scales and fp16 mins per group (see module doc)."""

    qweight: torch.Tensor  # int32 [out, in_padded // 8]
    scales: torch.Tensor  # fp16 [out, n_groups]
    mins: torch.Tensor  # fp16 [out, n_groups]
    shape: tuple[int, int]  # (out_features, in_features)
    group_size: int

    tensor_fields: ClassVar[tuple[str, ...]] = ("qweight", "scales", "mins")
    compute_dtype: ClassVar[torch.dtype | None] = None  # activations cast to this first (None: x's)

    def __post_init__(self) -> None:
        out_f, in_f = self.shape
        if self.group_size <= 0 or self.group_size % CODES_PER_WORD:
            raise ValueError(f"group_size must be a positive multiple of 8, got {self.group_size}")
        groups = -(-in_f // self.group_size)
        expect = {"qweight": ((out_f, groups * self.group_size // CODES_PER_WORD), torch.int32),
                  "scales": ((out_f, groups), torch.float16), "mins": ((out_f, groups), torch.float16)}
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"QuantTensor.{name}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")

    @property
    def n_groups(self) -> int:
        """Groups per row (the last one may be padded)."""
        return self.scales.shape[1]

    @property
    def in_padded(self) -> int:
        """``in_features`` rounded up to a whole number of groups."""
        return self.n_groups * self.group_size

    @property
    def device(self) -> torch.device:
        """Where the tensors live."""
        return self.qweight.device


# ---------------------------------------------------------------------------------------------------
# packing


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[rows, k]`` (integers 0..15, ``k % 8 == 0``) -> int32 words ``[rows, k // 8]``."""
    rows, k = codes.shape
    if k % CODES_PER_WORD:
        raise ValueError(f"pack_int4 needs a multiple of 8 codes per row, got {k}")
    c = codes.to(torch.uint8)
    packed = (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()  # uint8 [rows, k // 2]: low nibble = even code
    return packed.view(torch.int32)  # [rows, k // 8], little-endian words


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Int32 words ``[rows, w]`` -> uint8 codes ``[rows, 8 * w]`` (exact inverse of :func:`pack_int4`)."""
    rows = qweight.shape[0]
    b = qweight.contiguous().view(torch.uint8)  # [rows, 4 * w]
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(rows, -1)  # [rows, 8 * w]


# ---------------------------------------------------------------------------------------------------
# quantize / dequantize


def _pad_columns(w: torch.Tensor, width: int) -> torch.Tensor:
    """``w [rows, in]`` widened to ``width`` columns by repeating its last column (keeps group ranges)."""
    extra = width - w.shape[1]
    return w if extra == 0 else torch.cat([w, w[:, -1:].expand(-1, extra)], dim=1)


def quantize(w: torch.Tensor, group_size: int = 64) -> QuantTensor:
    """Round-to-nearest asymmetric int4 of ``w [out, in]``: per group ``min = min(w)``,
    ``scale = (max(w) - min) / 15`` (both fp16), ``q = round((w - min) / scale)``.

    ``in`` need not be a multiple of ``group_size``: the last group is padded by repeating the last
    column. Each value is reproduced within ``scale / 2`` plus fp16 rounding of scale and min.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    wf = w.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(wf).all()):
        raise ValueError("quantize: the weight holds inf or NaN")
    groups = -(-in_f // group_size)
    g = _pad_columns(wf, groups * group_size).view(out_f, groups, group_size)  # [out, G, gs]
    mins = g.amin(dim=-1).to(torch.float16)  # [out, G]
    scales = ((g.amax(dim=-1) - mins.float()) / CODE_MAX).to(torch.float16)  # [out, G]
    if not bool(torch.isfinite(scales).all() & torch.isfinite(mins).all()):
        raise ValueError("quantize: a group's range does not fit in fp16")
    s = scales.float().unsqueeze(-1)  # [out, G, 1]
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.round((g - mins.float().unsqueeze(-1)) * inv).clamp_(0, CODE_MAX)  # [out, G, gs]
    qweight = pack_int4(codes.view(out_f, -1).to(torch.uint8))
    return QuantTensor(qweight, scales, mins, (out_f, in_f), group_size).to(w.device)


# byte b of ``qweight`` -> its two codes as fp32 (low nibble first), the pair seen as one int64: one
# table lookup per byte gives both codes
_CODE_PAIRS = np.stack([np.arange(256) & 15, np.arange(256) >> 4], axis=1).astype(np.float32).view(np.int64)[:, 0]


def dequantize(q: QuantTensor) -> torch.Tensor:
    """The fp32 matrix ``[out, in]`` that ``q`` stands for: ``q * scale + min`` per group (reference)."""
    out_f, in_f = q.shape
    packed = q.qweight.contiguous().view(torch.uint8)  # [out, in_padded / 2]
    if packed.device.type == "cpu":  # numpy: single-threaded SIMD, unhurt by busy cores (unlike OpenMP)
        w = _CODE_PAIRS[packed.numpy()].view(np.float32).reshape(out_f, q.n_groups, q.group_size)
        w *= q.scales.numpy().astype(np.float32)[..., None]  # code * scale is exact in fp32
        w += q.mins.numpy().astype(np.float32)[..., None]
        return torch.from_numpy(w).view(out_f, q.in_padded)[:, :in_f]  # [out, in]
    codes = torch.from_numpy(_CODE_PAIRS).to(packed.device)[packed.long()].view(torch.float32)
    w = codes.view(out_f, q.n_groups, q.group_size)  # [out, G, gs]
    w.mul_(q.scales.float().unsqueeze(-1)).add_(q.mins.float().unsqueeze(-1))
    return w.view(out_f, q.in_padded)[:, :in_f]  # [out, in]


# ---------------------------------------------------------------------------------------------------
# GGUF import (integer codes are moved as integers: no float round trip)


def _gguf_blocks(raw: np.ndarray, shape: tuple[int, int], block_nbytes: int) -> np.ndarray:
    """``raw [rows, bytes]`` checked against ``shape`` and viewed as ``[rows, n_blocks, block_nbytes]``."""
    out_f, in_f = int(shape[0]), int(shape[1])
    if in_f % GGUF_BLOCK:
        raise ValueError(f"GGUF 4-bit rows must hold a multiple of 32 values, got {in_f}")
    n_blocks = in_f // GGUF_BLOCK
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.shape != (out_f, n_blocks * block_nbytes):
        raise ValueError(f"GGUF data of shape {raw.shape} does not match weight shape {shape}")
    return raw.reshape(out_f, n_blocks, block_nbytes)


def _fp16_field(blocks: np.ndarray, offset: int) -> torch.Tensor:
    """The fp16 stored at byte ``offset`` of every block -> ``[rows, n_blocks]``."""
    return torch.from_numpy(np.ascontiguousarray(blocks[:, :, offset:offset + 2]).view(np.float16)[..., 0])


def _gguf_qweight(nibbles: np.ndarray) -> torch.Tensor:
    """GGUF nibble bytes ``[rows, n_blocks, 16]`` (byte j: element j low, j + 16 high) -> ``qweight``.

    Repacked in place of unpack + :func:`pack_int4`: each pair of GGUF bytes (one uint16) gives one
    byte of elements ``2k, 2k + 1`` (their low nibbles) and one of ``16 + 2k, 17 + 2k`` (high nibbles).
    """
    rows = nibbles.shape[0]
    pairs = np.ascontiguousarray(nibbles).view(np.uint16)  # [rows, n_blocks, 8], little-endian
    low = (pairs & 0x000F) | ((pairs & 0x0F00) >> 4)  # elements 2k, 2k + 1
    high = ((pairs & 0x00F0) >> 4) | ((pairs & 0xF000) >> 8)  # elements 16 + 2k, 17 + 2k
    packed = np.concatenate([low.astype(np.uint8), high.astype(np.uint8)], axis=-1)  # [rows, n_blocks, 16]
    return torch.from_numpy(packed.reshape(rows, -1)).view(torch.int32)


def from_gguf_q4_1(raw: np.ndarray, shape: tuple[int, int]) -> QuantTensor:
    """A Q4_1 matrix (``raw`` uint8 ``[out, in / 32 * 20]``; block: fp16 d, fp16 m, 16 nibble bytes;
    ``w = q * d + m``) as a group-32 QuantTensor. Dequantizes bit-exactly like ``gguf.quants``."""
    blocks = _gguf_blocks(raw, shape, 20)
    scales, mins = _fp16_field(blocks, 0), _fp16_field(blocks, 2)
    qweight = _gguf_qweight(blocks[:, :, 4:])
    return QuantTensor(qweight, scales, mins, (int(shape[0]), int(shape[1])), GGUF_BLOCK)


def from_gguf_q4_0(raw: np.ndarray, shape: tuple[int, int]) -> QuantTensor:
    """A Q4_0 matrix (``raw`` uint8 ``[out, in / 32 * 18]``; block: fp16 d, 16 nibble bytes;
    ``w = (q - 8) * d``) as a group-32 QuantTensor with ``min = -8 d``. Dequantizes to the same values
    as ``gguf.quants`` (a zero may come back as +0.0 where gguf gives -0.0)."""
    blocks = _gguf_blocks(raw, shape, 18)
    scales = _fp16_field(blocks, 0)
    mins = scales * -8.0  # exact in fp16: a power-of-two scaling
    if not bool(torch.isfinite(mins).all()):
        raise ValueError("Q4_0 scale too large: -8 * d overflows fp16")
    qweight = _gguf_qweight(blocks[:, :, 2:])
    return QuantTensor(qweight, scales, mins, (int(shape[0]), int(shape[1])), GGUF_BLOCK)


# ---------------------------------------------------------------------------------------------------
# CPU matmul


def _split_even_odd(x2: torch.Tensor, in_padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 activations ``[rows, in]`` zero-padded to ``in_padded`` and split into even / odd columns."""
    xf = F.pad(x2.float(), (0, in_padded - x2.shape[1]))  # [rows, in_padded]
    return xf[:, 0::2].contiguous(), xf[:, 1::2].contiguous()  # 2 x [rows, in_padded / 2]


def _cpu_matmul(x2: torch.Tensor, q: QuantTensor) -> torch.Tensor:
    """fp32 ``x2 [rows, in] @ W^T`` on CPU with the numba kernels of :mod:`pipo.ops.kernels.cpu_int4`."""
    from pipo.ops.kernels import cpu_int4

    x_even, x_odd = _split_even_odd(x2, q.in_padded)
    codes = q.qweight.view(torch.uint8).numpy()  # [out, in_padded / 2]
    scales, mins = q.scales.float().numpy(), q.mins.float().numpy()
    with _CPU_KERNEL_LOCK:
        if x2.shape[0] <= CPU_DOT_MAX_ROWS:
            out = np.empty((x2.shape[0], q.shape[0]), np.float32)
            cpu_int4.gemm_rows(codes, x_even.numpy(), x_odd.numpy(), scales, mins, out)
            return torch.from_numpy(out)  # [rows, out]
        w_perm = np.empty((q.shape[0], q.in_padded), np.float32)
        cpu_int4.dequant_even_odd(codes, scales, mins, w_perm)  # columns: even codes, then odd codes
    return F.linear(torch.cat([x_even, x_odd], dim=1), torch.from_numpy(w_perm))  # [rows, out]


def int4_linear(x: torch.Tensor, q: QuantTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] @ W^T + bias`` -> ``[..., out]`` in ``x.dtype``, accumulated in fp32.

    On CPU a numba kernel multiplies on the packed codes (nothing is cached between calls); on other
    devices this is the fallback ``dequantize`` + ``F.linear`` (see ``pipo.ops.int4_dispatch``).
    """
    out_f, in_f = q.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"int4_linear: x has {x.shape[-1]} features, weight expects {in_f}")
    x2 = x.reshape(-1, in_f)  # [rows, in]
    if x.device.type == "cpu" and q.device.type == "cpu":
        y = _cpu_matmul(x2, q)  # fp32 [rows, out]
    else:
        y = F.linear(x2.float(), dequantize(q))  # fp32 [rows, out]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], out_f)  # [..., out]
