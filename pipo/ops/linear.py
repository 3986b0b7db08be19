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

    ``w`` is a dense ``torch.Tensor`` or a ``pipo.ops.quant.QuantTensor`` (int4, dequantized by
    ``pipo.ops.int4_dispatch.int4_matmul``). Anything else is a bug in the caller and raises ``TypeError``.
    """
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)  # [..., out]
    from pipo.ops import quant  # lazy: dense-only runs never import the quantization code

    if isinstance(w, quant.QuantTensor):
        from pipo.ops.int4_dispatch import int4_matmul

        return int4_matmul(x, w, b)  # [..., out]: CPU routine, CUDA GEMV or dequant + matmul
    raise TypeError(f"linear() got a weight of type {type(w).__name__}; expected a tensor or QuantTensor")
