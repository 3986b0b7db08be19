"""One matrix product for every weight kind: dense torch tensors and int4 :class:`QuantTensor`.

Weights are stored ``[out_features, in_features]`` as in ``torch.nn.Linear``. A dense weight must
already be in the compute dtype of ``x`` and on its device: the engine casts and moves weights once,
when it loads a block, never per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + b`` for x [..., in] and w [out, in] -> [..., out].

    ``w`` is a dense ``torch.Tensor``, a ``pipo.ops.quant.QuantTensor`` (int4, multiplied by
    ``pipo.ops.int4_dispatch.int4_matmul``), a ``pipo.ops.int4pack.PackedInt4`` (CPU placement) or a
    ``pipo.io.q8.Q8Tensor`` (a Q8_0 head streamed to the CPU, ``pipo.io.q8.q8_linear``).
    Anything else is a bug in the caller and raises ``TypeError``.
    """
    if isinstance(w, torch.Tensor):
        if x.dtype != w.dtype:  # an fp32 residual stream meeting bf16 weights (CPU 4-bit path)
            x = x.to(w.dtype)
        return F.linear(x, w, b)  # [..., out]
    from pipo.ops import quant  # lazy: dense-only runs never import the quantization code

    if isinstance(w, quant.QuantTensor):
        from pipo.ops.int4_dispatch import int4_matmul

        if w.compute_dtype is not None and x.dtype != w.compute_dtype:
            x = x.to(w.compute_dtype)  # a streamed StoredInt4: bf16 like the packed path
        return int4_matmul(x, w, b)  # [..., out]: CPU routine, CUDA GEMV or dequant + matmul
    from pipo.ops.int4pack import PackedInt4, packed_linear

    if isinstance(w, PackedInt4):
        return packed_linear(x, w, b)  # [..., out]: torch's CPU int4 kernel (a packed Q8 too)
    from pipo.io.q8 import Q8Tensor, q8_linear

    if isinstance(w, Q8Tensor):
        return q8_linear(x, w, b)  # [..., out]: a streamed Q8_0 head multiplied as stored (CPU)
    raise TypeError(f"linear() got a weight of type {type(w).__name__}; expected a tensor or QuantTensor")
