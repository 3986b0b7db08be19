"""CPU (numba ``njit``) product with a GGUF Q8_0 matrix as stored: the CPU half of
:func:`pipo.io.q8.q8_linear`, for an LM head streamed from an offload store (no repack per load).

``codes`` int8 ``[N, K]``, ``scales`` fp32 ``[N, K / 32]`` (the fp16 scales, one copy per call),
activations fp32 ``[B, K]``. Each weight row is read once and multiplied with every activation row,
so at batch 1 the kernel reads the 8-bit matrix once: memory speed, whatever the layout torch's own
int4 kernel wants. Products of a group are summed in fp32 and scaled once per group.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

GROUP = 32  # values per Q8_0 scale
ROWS_PER_CHUNK = 64  # weight rows one thread handles before taking the next chunk


@njit(cache=True, fastmath=True, parallel=True)
def q8_gemm_rows(codes, scales, x, out):
    """``out[b, n] = sum_g scales[n, g] * sum_j codes[n, 32 g + j] * x[b, 32 g + j]``.

    codes int8 [N, K]; scales fp32 [N, K / 32]; x fp32 [B, K]; out fp32 [B, N].
    """
    n_rows, k = codes.shape
    n_groups = k // GROUP
    for c in prange((n_rows + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK):
        row = np.empty(k, np.float32)
        for n in range(c * ROWS_PER_CHUNK, min(n_rows, (c + 1) * ROWS_PER_CHUNK)):
            for g in range(n_groups):
                s = scales[n, g]
                for j in range(g * GROUP, (g + 1) * GROUP):
                    row[j] = np.float32(codes[n, j]) * s
            for b in range(x.shape[0]):
                xb = x[b]
                acc = np.float32(0.0)
                for j in range(k):
                    acc += row[j] * xb[j]
                out[b, n] = acc
