"""GGUF Q8_0 weights kept as stored: :class:`Q8Tensor` (int8 codes, one fp16 scale per 32 values).

A Q8_0 block is an fp16 scale ``d`` and 32 int8 codes; the value is ``q * d``. The product of an
8-bit code and an 11-bit fp16 mantissa is exact in fp32, so :meth:`Q8Tensor.dequantize` gives the very
values ``gguf.quants`` does, whatever the order of operations. Dense placement dequantizes them;
the CPU 4-bit path keeps them: an embedding is a row lookup (:meth:`Q8Tensor.rows`) and a head is
multiplied with torch's int4 kernel as two exact 4-bit halves (``pipo.ops.int4pack.pack_q8``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pipo.ops.quant import PartsRecord, QuantTensor, dequantize

Q8_BLOCK = 32  # values per Q8_0 block
Q8_BLOCK_NBYTES = 34  # fp16 scale + 32 int8 codes


@dataclass(frozen=True, slots=True, eq=False)
class Q8Tensor(PartsRecord):
    """A Q8_0 matrix ``[out, in]``: ``codes`` int8 ``[out, in]``, ``scales`` fp16 ``[out, in / 32]``."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    group_size: int = Q8_BLOCK

    tensor_fields: ClassVar[tuple[str, ...]] = ("codes", "scales")

    def __post_init__(self) -> None:
        out_f, in_f = self.shape
        if self.group_size != Q8_BLOCK or in_f % Q8_BLOCK:
            raise ValueError(f"Q8Tensor needs groups of 32 and rows of whole groups, got {self.shape}")
        expect = {"codes": ((out_f, in_f), torch.int8), "scales": ((out_f, in_f // Q8_BLOCK), torch.float16)}
        for name, (shape, dtype) in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"Q8Tensor.{name}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The matrix ``[out, in]`` in ``dtype`` (computed in fp32: exact, then one cast)."""
        out_f, in_f = self.shape
        values = self.codes.numpy().reshape(out_f, in_f // Q8_BLOCK, Q8_BLOCK).astype(np.float32)
        values *= self.scales.numpy().astype(np.float32)[..., None]  # numpy: see quant.dequantize
        return torch.from_numpy(values).view(out_f, in_f).to(dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) dequantized to fp32: ``[*ids.shape, in]`` (an embedding lookup
        that reads only the rows asked for; exact, as :meth:`dequantize`)."""
        in_f = self.shape[1]
        codes = self.codes[ids].view(*ids.shape, in_f // Q8_BLOCK, Q8_BLOCK)  # int8 [..., G, 32]
        scales = self.scales[ids].unsqueeze(-1).float()  # [..., G, 1]
        return (codes * scales).view(*ids.shape, in_f)  # fp32 [..., in]


def from_gguf_q8_0(raw: np.ndarray, shape: tuple[int, int]) -> Q8Tensor:
    """A Q8_0 matrix from its raw blocks (``raw`` uint8 ``[out, in / 32 * 34]``), copied out of the file."""
    out_f, in_f = int(shape[0]), int(shape[1])
    if in_f % Q8_BLOCK or raw.shape != (out_f, in_f // Q8_BLOCK * Q8_BLOCK_NBYTES):
        raise ValueError(f"Q8_0 data of shape {raw.shape} does not match weight shape {shape}")
    blocks = raw.reshape(out_f, in_f // Q8_BLOCK, Q8_BLOCK_NBYTES)
    scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).reshape(out_f, -1)
    codes = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(out_f, in_f)
    return Q8Tensor(torch.from_numpy(codes), torch.from_numpy(scales), (out_f, in_f))


def to_dense(value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``value`` as a dense tensor: a torch tensor as it is, a quantized record dequantized (fp32),
    then cast to ``dtype`` when given (floating tensors only)."""
    if isinstance(value, Q8Tensor):
        value = value.dequantize()
    elif isinstance(value, QuantTensor):
        value = dequantize(value)
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    return value


def q8_linear(x: torch.Tensor, q8: Q8Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., in] @ W^T + bias -> [..., out]`` in ``x.dtype`` on the CPU, ``W`` read as stored
    (numba kernel :mod:`pipo.ops.kernels.cpu_q8`; fp32 products): for a Q8_0 head streamed from an
    offload store, where repacking it for torch's int4 kernel on every load would cost more than the
    product."""
    from pipo.ops.kernels import cpu_q8
    from pipo.ops.quant import _CPU_KERNEL_LOCK

    out_f, in_f = q8.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"q8_linear: x has {x.shape[-1]} features, weight expects {in_f}")
    x2 = x.reshape(-1, in_f).float().contiguous()  # [rows, in]
    out = np.empty((x2.shape[0], out_f), np.float32)
    with _CPU_KERNEL_LOCK:
        cpu_q8.q8_gemm_rows(q8.codes.numpy(), q8.scales.float().numpy(), x2.numpy(), out)
    y = torch.from_numpy(out)  # [rows, out]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], out_f)  # [..., out]
