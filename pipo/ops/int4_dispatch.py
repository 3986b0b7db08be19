"""One entry point for ``x @ W^T`` with an int4 :class:`~pipo.ops.quant.QuantTensor`, on any device.

Policy:
- activations on the CPU (or any non-CUDA device) -> :func:`pipo.ops.quant.int4_linear`;
- CUDA and at most ``gemv_max_batch`` activation rows -> the fused GEMV kernel (reads the packed
  weights once; the decode-step case, bound by weight bytes);
- CUDA and more rows -> dequantize kernel into a dense matrix + ``F.linear`` (prefill: cuBLAS is
  compute-efficient and the dequantize pass is small next to the product).

Per-engine state lives in an :class:`Int4Workspace` (owned by the engine's placed weights, made
current for each compute task by ``PlacedWeights.block``): the kernels' argument wrappers of weight
views, made once per view instead of once per launch, and the dense matrices of the block being
computed, so prefill dequantizes each matrix once per block and step rather than once per
micro-batch. Dense matrices are allocated on the stream that computes with them and keyed by it, so
the caching allocator only ever reuses their memory in that stream's order; nothing is shared
between engines or streams. Without a current workspace (direct calls) nothing is cached.

The CUDA kernel modules are imported on first CUDA use only (or by :func:`prepare_kernels` when the
engine places int4 weights on a GPU), so CPU runs never touch numba-cuda.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
import torch.nn.functional as F

from pipo.ops.quant import QuantTensor, int4_linear

GEMV_MAX_BATCH = 8  # rows up to which the fused GEMV beats dequantize + matmul (capped by the kernel)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Int4Workspace:
    """Cached kernel arguments and per-block dense matrices of one engine (see the module doc)."""

    def __init__(self):
        self._arrays: dict[tuple, tuple] = {}
        self._dense: dict[tuple, tuple[QuantTensor, torch.Tensor]] = {}
        self._block: dict | None = None

    def begin_block(self, tensors: dict) -> None:
        """Make this workspace current for the compute that follows, on ``tensors`` (a block's
        weights); a different block than last time drops the previous block's dense matrices."""
        if tensors is not self._block:
            self._dense.clear()
            self._block = tensors
        _CURRENT.set(self)

    def weight_arrays(self, q: QuantTensor) -> tuple:
        """``q``'s kernel arguments, wrapped on first use of this weight view (same address, shape
        and dtype: a slot refilled with a block of the same layout reuses them)."""
        key = (q.qweight.data_ptr(), q.scales.data_ptr(), q.mins.data_ptr(), q.shape, q.group_size)
        arrays = self._arrays.get(key)
        if arrays is None:
            from pipo.ops.kernels.cuda_adapter import weight_arrays

            arrays = self._arrays[key] = weight_arrays(q)
        return arrays

    def dense(self, q: QuantTensor, dtype: torch.dtype, stream) -> torch.Tensor | None:
        """The dense ``[out, in_padded]`` matrix of ``q`` made on ``stream`` in this block, if any."""
        hit = self._dense.get((id(q), dtype, stream))
        return hit[1] if hit is not None else None

    def keep_dense(self, q: QuantTensor, dtype: torch.dtype, stream, w: torch.Tensor) -> None:
        """Remember ``w`` as ``q``'s dense matrix on ``stream`` until the block changes (holding
        ``q`` keeps its ``id`` from being reused meanwhile)."""
        self._dense[(id(q), dtype, stream)] = (q, w)

    def close(self) -> None:
        """Drop every cached wrapper and matrix; stop being the current workspace."""
        self._arrays.clear()
        self._dense.clear()
        self._block = None
        if _CURRENT.get() is self:
            _CURRENT.set(None)


_CURRENT: ContextVar[Int4Workspace | None] = ContextVar("pipo_int4_workspace", default=None)


def current_workspace() -> Int4Workspace | None:
    """The workspace of the compute running in this context (``None`` outside the engine)."""
    return _CURRENT.get()


def prepare_kernels(device: torch.device, dtype: torch.dtype) -> None:
    """Compile and load the CUDA kernels :func:`int4_matmul` launches for ``dtype`` activations on
    ``device`` (once per process and device), so numba's import, the driver set-up and the JIT
    happen when weights are placed rather than inside the first compute task. No-op off CUDA."""
    if device.type != "cuda":
        return
    if dtype not in CUDA_DTYPES:
        raise TypeError(f"int4 kernels compute in fp16, bf16 or fp32, not {dtype}")
    from pipo.ops.kernels import dequant_int4, gemv_int4
    from pipo.ops.kernels.cuda_adapter import device_scope

    with device_scope(device):
        gemv_int4.prepare(dtype)
        dequant_int4.prepare(dtype)


def int4_matmul(x: torch.Tensor, q: QuantTensor, bias: torch.Tensor | None = None,
                gemv_max_batch: int = GEMV_MAX_BATCH) -> torch.Tensor:
    """``x [..., in] @ W^T + bias -> [..., out]`` in ``x.dtype``, fp32 accumulation, best path for the device."""
    if x.device.type != "cuda":
        return int4_linear(x, q, bias)
    if x.dtype not in CUDA_DTYPES:
        raise TypeError(f"int4_matmul: activations must be fp16, bf16 or fp32 on CUDA, got {x.dtype}")
    if q.device != x.device:
        raise ValueError(f"int4_matmul: weight on {q.device}, activations on {x.device}")
    from pipo.ops.kernels import gemv_int4

    out_f, in_f = q.shape
    x2 = x.reshape(-1, in_f).contiguous()  # [rows, in]
    workspace = current_workspace()
    if 0 < x2.shape[0] <= min(gemv_max_batch, gemv_int4.MAX_BATCH):
        weights = workspace.weight_arrays(q) if workspace else None
        y = gemv_int4.gemv_int4(x2, q, weights=weights)  # [rows, out]
    else:
        y = dequant_matmul(x2, q, workspace)  # [rows, out]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], out_f)  # [..., out]


def dequant_matmul(x2: torch.Tensor, q: QuantTensor, workspace: Int4Workspace | None = None
                   ) -> torch.Tensor:
    """``x2 [rows, in] @ W^T -> [rows, out]`` via the dequantize kernel and ``F.linear``.

    The dense weight has ``x2``'s dtype (fp16 for fp16 activations; torch accumulates in fp32). With
    a ``workspace``, it is made once per block and stream and reused by the block's next micro-batches.
    """
    from pipo.ops.kernels import dequant_int4
    from pipo.ops.kernels.cuda_adapter import current_stream

    stream = current_stream(x2.device)
    w = workspace.dense(q, x2.dtype, stream) if workspace else None
    if w is None:
        w = torch.empty(q.shape[0], q.in_padded, dtype=x2.dtype, device=x2.device)  # [out, in_padded]
        dequant_int4.dequant_int4(q, w, weights=workspace.weight_arrays(q) if workspace else None)
        if workspace:
            workspace.keep_dense(q, x2.dtype, stream, w)
    return F.linear(x2, w[:, :q.shape[1]])  # [rows, out]: the padding columns are never read
