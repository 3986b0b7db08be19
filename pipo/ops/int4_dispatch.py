"""One entry point for ``x @ W^T`` with an int4 :class:`~pipo.ops.quant.QuantTensor`, on any device.

Policy:
- activations on the CPU (or any non-CUDA device) -> :func:`pipo.ops.quant.int4_linear`;
- CUDA and at most ``gemv_max_batch`` activation rows -> the fused GEMV kernel (reads the packed
  weights once; the decode-step case, bound by weight bytes);
- CUDA and more rows -> dequantize kernel into a reused scratch buffer + ``F.linear`` (prefill: cuBLAS
  is compute-efficient and the dequantize pass is small next to the product).

The CUDA kernel modules are imported on first CUDA use only, so CPU runs never touch numba-cuda.
"""

from __future__ import annotations

import torch

from pipo.ops.quant import QuantTensor, int4_linear

GEMV_MAX_BATCH = 8  # rows up to which the fused GEMV beats dequantize + matmul (capped by the kernel)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def int4_matmul(x: torch.Tensor, q: QuantTensor, bias: torch.Tensor | None = None,
                gemv_max_batch: int = GEMV_MAX_BATCH) -> torch.Tensor:
    """``x [..., in] @ W^T + bias -> [..., out]`` in ``x.dtype``, fp32 accumulation, best path for the device."""
    if x.device.type != "cuda":
        return int4_linear(x, q, bias)
    if x.dtype not in CUDA_DTYPES:
        raise TypeError(f"int4_matmul: activations must be fp16, bf16 or fp32 on CUDA, got {x.dtype}")
    if q.device != x.device:
        raise ValueError(f"int4_matmul: weight on {q.device}, activations on {x.device}")
    from pipo.ops.kernels import dequant_int4, gemv_int4

    out_f, in_f = q.shape
    x2 = x.reshape(-1, in_f).contiguous()  # [rows, in]
    if 0 < x2.shape[0] <= min(gemv_max_batch, gemv_int4.MAX_BATCH):
        y = gemv_int4.gemv_int4(x2, q)  # [rows, out]
    else:
        y = dequant_int4.dequant_matmul(x2, q)  # [rows, out]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], out_f)  # [..., out]
