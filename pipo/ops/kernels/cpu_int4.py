"""CPU (numba ``njit``) kernels on packed int4 weights; the CPU half of ``pipo.ops.quant.int4_linear``.

Both kernels read the codes as uint8 ``[out, in_padded / 2]`` (byte ``j``: code ``2j`` low nibble,
``2j + 1`` high nibble) and fp32 copies of the fp16 scales / mins ``[out, n_groups]``.

Why the even/odd split: decoding a byte into two separate fp32 buffers (``lo``, ``hi``) keeps every
inner loop unit-stride, so LLVM vectorizes it; interleaved stores (``w[2j]``, ``w[2j+1]``) and loops of
one group's length (16 iterations) were measured 4-8x slower. Activations are split the same way
(``x_even``, ``x_odd``) by the caller. Scales and mins are broadcast into per-column buffers once per
row for the same reason. Rows are handled in chunks so each thread allocates its buffers once.

Threads: ``parallel=True`` runs chunks of rows on numba's thread pool. Callers serialize calls (the
workqueue threading layer aborts on concurrent entry).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

ROWS_PER_CHUNK = 16  # rows one thread dequantizes into its private buffers before moving on


@njit(cache=True)
def _row_buffers(half):
    """A thread's private fp32 buffers for one chunk: lo, hi, per-column scale, per-column min."""
    return (np.empty(half, np.float32), np.empty(half, np.float32),
            np.empty(half, np.float32), np.empty(half, np.float32))


@njit(cache=True, fastmath=True)
def _decode_row(row, scales_row, mins_row, lo, hi, scale_buf, min_buf):
    """Row codes -> fp32 values: ``lo[j]`` = element 2j, ``hi[j]`` = element 2j + 1."""
    half_group = row.shape[0] // scales_row.shape[0]
    for g in range(scales_row.shape[0]):
        s = scales_row[g]
        m = mins_row[g]
        for j in range(g * half_group, (g + 1) * half_group):
            scale_buf[j] = s
            min_buf[j] = m
    for j in range(row.shape[0]):
        byte = np.int32(row[j])
        lo[j] = np.float32(byte & 15) * scale_buf[j] + min_buf[j]
        hi[j] = np.float32(byte >> 4) * scale_buf[j] + min_buf[j]


@njit(cache=True, fastmath=True, parallel=True)
def gemm_rows(codes, x_even, x_odd, scales, mins, out):
    """``out[b, n] = sum_k x[b, k] * W[n, k]`` for a few activation rows (decode steps).

    codes uint8 [N, H]; x_even / x_odd fp32 [B, H] (H = in_padded / 2, zero past ``in``);
    scales / mins fp32 [N, G]; out fp32 [B, N]. Each weight row is decoded once and reused for all B.
    """
    n_rows, half = codes.shape
    for c in prange((n_rows + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK):
        lo, hi, scale_buf, min_buf = _row_buffers(half)
        for n in range(c * ROWS_PER_CHUNK, min(n_rows, (c + 1) * ROWS_PER_CHUNK)):
            _decode_row(codes[n], scales[n], mins[n], lo, hi, scale_buf, min_buf)
            for b in range(x_even.shape[0]):
                xe = x_even[b]
                xo = x_odd[b]
                acc = np.float32(0.0)
                for j in range(half):
                    acc += lo[j] * xe[j] + hi[j] * xo[j]
                out[b, n] = acc


@njit(cache=True, fastmath=True, parallel=True)
def dequant_even_odd(codes, scales, mins, out):
    """fp32 weights with permuted columns: ``out[n, :H]`` = even elements, ``out[n, H:]`` = odd ones.

    codes uint8 [N, H]; scales / mins fp32 [N, G]; out fp32 [N, 2H]. Multiply by activations whose
    columns are permuted the same way (``cat([x_even, x_odd])``).
    """
    n_rows, half = codes.shape
    for c in prange((n_rows + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK):
        lo, hi, scale_buf, min_buf = _row_buffers(half)
        for n in range(c * ROWS_PER_CHUNK, min(n_rows, (c + 1) * ROWS_PER_CHUNK)):
            _decode_row(codes[n], scales[n], mins[n], lo, hi, scale_buf, min_buf)
            out[n, :half] = lo
            out[n, half:] = hi
