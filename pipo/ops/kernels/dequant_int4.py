"""Dequantize int4 weights on the GPU, for batches where cuBLAS on dense weights beats the GEMV.

For batches above the GEMV threshold the matrix product is compute-bound enough that cuBLAS wins:
one pass writes ``W`` (fp16, or the activations' bf16 / fp32) into a dense buffer and ``F.linear``
does the rest (:func:`pipo.ops.int4_dispatch.dequant_matmul`, which owns the buffers).

The output is ``[out, in_padded]`` (whole groups; the padding columns hold ``min`` and are sliced
away by the caller), so every word's 8 values are written, with 16-byte stores.

Kernel: grid ``(out, ceil(words / THREADS))``, one thread per int32 word (8 codes); consecutive
threads read consecutive words of one row (coalesced 4-byte loads) and each writes its 8 values as
one 16-byte store (fp16 / bf16: pairs packed into int32) or two (fp32). Value: ``w = q * scale + min``
in fp32 (exact product, one rounding), then rounded to the output dtype.

llm.c-style: :func:`reference` (float64), :func:`validate`, :func:`bench`; ``python -m`` runs both.
"""

from __future__ import annotations

import functools

import torch
from numba import cuda, float32, int32
from numba.core import types

from pipo.ops.kernels import checks
from pipo.ops.kernels.cuda_adapter import (array_type, as_array, current_stream, device_function,
                                           device_scope, float_as_int, jit_kernel, kernel_device,
                                           pack_f16x2, store_bf16, store_words4, weight_arrays)
from pipo.ops.quant import CODES_PER_WORD, QuantTensor, unpack_int4

THREADS = 128  # threads per block; each handles one 32-bit word
STORE_ALIGN_NBYTES = 16


@device_function
def _store8_f16(out, n, w, v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight fp16 values of word ``w`` as one 16-byte store (``out``: the row's int32 view)."""
    store_words4(out, n, 4 * w, pack_f16x2(v0, v1), pack_f16x2(v2, v3), pack_f16x2(v4, v5),
                 pack_f16x2(v6, v7))


@device_function
def _pack_bf16x2(lo, hi):
    return (int32(store_bf16(lo)) & 0xFFFF) | (int32(store_bf16(hi)) << 16)


@device_function
def _store8_bf16(out, n, w, v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight bf16 values of word ``w`` as one 16-byte store."""
    store_words4(out, n, 4 * w, _pack_bf16x2(v0, v1), _pack_bf16x2(v2, v3), _pack_bf16x2(v4, v5),
                 _pack_bf16x2(v6, v7))


@device_function
def _store8_f32(out, n, w, v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight fp32 values of word ``w`` as two 16-byte stores."""
    store_words4(out, n, 8 * w, float_as_int(v0), float_as_int(v1), float_as_int(v2), float_as_int(v3))
    store_words4(out, n, 8 * w + 4, float_as_int(v4), float_as_int(v5), float_as_int(v6),
                 float_as_int(v7))


STORE8 = {torch.float16: _store8_f16, torch.bfloat16: _store8_bf16, torch.float32: _store8_f32}


def _make_kernel(store8):
    """The dequantize kernel writing each word's 8 values through the device function ``store8``."""

    def dequant(qweight, scales, mins, out, words_per_group):
        """out[n, 8w:8w+8] = q * scale + min for word w of row n (one thread per word)."""
        n = cuda.blockIdx.x
        w = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        if n >= qweight.shape[0] or w >= qweight.shape[1]:
            return
        word = qweight[n, w]
        g = w // words_per_group
        s = float32(scales[n, g])
        m = float32(mins[n, g])
        store8(out, n, w, float32(word & 15) * s + m, float32((word >> 4) & 15) * s + m,
               float32((word >> 8) & 15) * s + m, float32((word >> 12) & 15) * s + m,
               float32((word >> 16) & 15) * s + m, float32((word >> 20) & 15) * s + m,
               float32((word >> 24) & 15) * s + m, float32((word >> 28) & 15) * s + m)

    return dequant


def kernel_function(dtype: torch.dtype):
    """The Python kernel function for output ``dtype`` (fp16, bf16 or fp32)."""
    return _make_kernel(STORE8[dtype])


def signature(dtype: torch.dtype):
    """The kernel's one numba signature (the output is passed as its int32 view, for any ``dtype``)."""
    words, half = array_type(torch.int32), array_type(torch.float16)
    return types.void(words, half, half, words, types.int32)


@functools.cache
def _kernel(dtype: torch.dtype):
    """The kernel for ``dtype``, compiled on first use for its one signature."""
    return jit_kernel(kernel_function(dtype), [signature(dtype)])


def prepare(dtype: torch.dtype) -> None:
    """Compile the kernel for ``dtype`` now and load it into the current context."""
    _kernel(dtype)


@functools.cache
def _launcher(dtype: torch.dtype, out_features: int, n_words: int, stream):
    """The configured launch for one weight shape on one stream."""
    grid = (out_features, -(-n_words // THREADS))
    return _kernel(dtype)[grid, THREADS, stream]


def dequant_int4(q: QuantTensor, out: torch.Tensor, *, weights: tuple | None = None) -> torch.Tensor:
    """Write the values of ``q`` into ``out [out_features, in_padded]`` (fp16, bf16 or fp32; contiguous,
    16-byte aligned). ``weights``: ``cuda_adapter.weight_arrays(q)`` made earlier (default: now)."""
    out_f, n_words = q.qweight.shape
    if tuple(out.shape) != (out_f, q.in_padded) or not out.is_contiguous() or \
            out.data_ptr() % STORE_ALIGN_NBYTES:
        raise ValueError(f"dequant_int4: out must be contiguous, 16-byte aligned {(out_f, q.in_padded)}, "
                         f"got {tuple(out.shape)}")
    with device_scope(out.device):
        launch = _launcher(out.dtype, out_f, n_words, current_stream(out.device))
        launch(*(weights or weight_arrays(q)), as_array(out.view(torch.int32)),
               q.group_size // CODES_PER_WORD)
    return out


# ---------------------------------------------------------------------------------------------------
# llm.c-style reference, check and benchmark


def reference(q: QuantTensor) -> torch.Tensor:
    """float64 ``[out, in]`` values of ``q`` (on the CPU)."""
    out_f, in_f = q.shape
    codes = unpack_int4(q.qweight.cpu()).view(out_f, q.n_groups, q.group_size).double()
    w = codes * q.scales.cpu().double().unsqueeze(-1) + q.mins.cpu().double().unsqueeze(-1)
    return w.view(out_f, q.in_padded)[:, :in_f]


def validate(out_features: int, in_features: int, group_size: int = 64, dtype: torch.dtype = torch.float16,
             seed: int = 0) -> float:
    """Run the kernel once into a NaN-poisoned output; return its relative error vs :func:`reference`.

    Raises ``AssertionError`` past :func:`checks.tolerance` (a NaN left anywhere counts as infinite).
    """
    device = kernel_device()
    q = checks.random_quant(out_features, in_features, group_size, device, seed)
    out = torch.full((out_features, q.in_padded), float("nan"), dtype=dtype, device=device)
    dequant_int4(q, out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    err = checks.relative_error(out[:, :in_features], reference(q))
    assert err <= checks.tolerance(dtype), f"dequant_int4 {q.shape} g{group_size} {dtype}: rel err {err:.2e}"
    return err


def bench(out_features: int = 4096, in_features: int = 4096, group_size: int = 64, repeats: int = 20) -> dict:
    """Time the fp16 dequantize kernel; print and return seconds and GB/s (bytes read + written)."""
    q = checks.random_quant(out_features, in_features, group_size, torch.device("cuda"))
    out = torch.empty(out_features, q.in_padded, dtype=torch.float16, device="cuda")
    elapsed_s = checks.time_cuda_s(lambda: dequant_int4(q, out), repeats)
    moved_nbytes = q.nbytes + out.numel() * out.element_size()
    gbps = moved_nbytes / elapsed_s / 1e9
    print(f"dequant_int4 {out_features}x{in_features} g{group_size}: {elapsed_s * 1e6:.1f} us, {gbps:.0f} GB/s")
    return {"elapsed_s": elapsed_s, "gbps": gbps, "moved_nbytes": moved_nbytes}


if __name__ == "__main__":
    print("max rel err", validate(96, 200, 32, torch.float16), validate(64, 130, 64, torch.bfloat16))
    if torch.cuda.is_available():
        bench()
