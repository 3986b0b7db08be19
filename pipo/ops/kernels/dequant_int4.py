"""Dequantize int4 weights on the GPU into a reused scratch buffer, then multiply with torch.

For batches above the GEMV threshold the matrix product is compute-bound enough that cuBLAS wins:
one pass writes ``W [out, in]`` (fp16, or the activations' bf16 / fp32) into a per-device scratch
buffer and ``F.linear`` does the rest.

Kernel: grid ``(out, ceil(words / THREADS))``, one thread per int32 word (8 codes); consecutive
threads read consecutive words of one row (coalesced) and write 8 consecutive outputs.
Value: ``w = q * scale + min`` in fp32 (exact product, one rounding), then rounded to the output dtype.

llm.c-style: :func:`reference` (float64), :func:`validate`, :func:`bench`; ``python -m`` runs both.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from numba import cuda, float32
from numba.core import types

from pipo.ops.kernels import checks
from pipo.ops.kernels.cuda_adapter import (LOAD_STORE, array_type, as_array, current_stream, jit_kernel,
                                           kernel_device)
from pipo.ops.quant import CODES_PER_WORD, QuantTensor, unpack_int4

THREADS = 128  # threads per block; each handles one 32-bit word


def _make_kernel(store):
    """The dequantize kernel writing through the device function ``store`` (fp32 -> output dtype)."""

    def dequant(qweight, scales, mins, out, in_features, words_per_group):
        """out[n, 8w:8w+8] = q * scale + min for word w of row n (one thread per word)."""
        n = cuda.blockIdx.x
        w = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        if n >= out.shape[0] or w * 8 >= in_features:
            return
        word = qweight[n, w]
        g = w // words_per_group
        s = float32(scales[n, g])
        m = float32(mins[n, g])
        k0 = w * 8
        for i in range(8):
            if k0 + i < in_features:
                out[n, k0 + i] = store(float32((word >> (4 * i)) & 15) * s + m)

    return dequant


def kernel_function(dtype: torch.dtype):
    """The Python kernel function for output ``dtype`` (fp16, bf16 or fp32)."""
    return _make_kernel(LOAD_STORE[dtype][1])


def signature(dtype: torch.dtype):
    """The kernel's one numba signature for ``dtype``: (qweight, scales, mins, out, in, words/group)."""
    half = array_type(torch.float16)
    return types.void(array_type(torch.int32), half, half, array_type(dtype), types.int32, types.int32)


@functools.cache
def _kernel(dtype: torch.dtype):
    """The kernel for ``dtype``, compiled on first use for its one signature."""
    return jit_kernel(kernel_function(dtype), [signature(dtype)])


@functools.cache
def _launcher(dtype: torch.dtype, out_features: int, n_words: int, stream):
    """The configured launch for one weight shape on one stream."""
    grid = (out_features, -(-n_words // THREADS))
    return _kernel(dtype)[grid, THREADS, stream]


def dequant_int4(q: QuantTensor, out: torch.Tensor) -> torch.Tensor:
    """Write the values of ``q`` into ``out [out_features, in_features]`` (fp16, bf16 or fp32)."""
    out_f, in_f = q.shape
    if tuple(out.shape) != (out_f, in_f) or not out.is_contiguous():
        raise ValueError(f"dequant_int4: out must be contiguous {q.shape}, got {tuple(out.shape)}")
    n_words = -(-in_f // CODES_PER_WORD)
    launch = _launcher(out.dtype, out_f, n_words, current_stream())
    launch(as_array(q.qweight), as_array(q.scales), as_array(q.mins), as_array(out), in_f,
           q.group_size // CODES_PER_WORD)
    return out


_SCRATCH: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused flat buffer of at least ``numel`` elements (grown, never shrunk).

    One buffer per (device, dtype), used in stream order: callers on several streams at once must
    not share it (pipo runs all compute on one stream).
    """
    key = (str(device), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH[key] = buf
    return buf[:numel]


def dequant_matmul(x2: torch.Tensor, q: QuantTensor) -> torch.Tensor:
    """``x2 [rows, in] @ W^T -> [rows, out]`` via the dequantize kernel and ``F.linear``.

    The scratch weight has ``x2``'s dtype (fp16 for fp16 activations); torch accumulates in fp32.
    """
    w = scratch(q.shape[0] * q.shape[1], x2.dtype, x2.device).view(q.shape)
    return F.linear(x2, dequant_int4(q, w))  # [rows, out]


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
    out = torch.full((out_features, in_features), float("nan"), dtype=dtype, device=device)
    dequant_int4(q, out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    err = checks.relative_error(out, reference(q))
    assert err <= checks.tolerance(dtype), f"dequant_int4 {q.shape} g{group_size} {dtype}: rel err {err:.2e}"
    return err


def bench(out_features: int = 4096, in_features: int = 4096, group_size: int = 64, repeats: int = 20) -> dict:
    """Time the fp16 dequantize kernel; print and return seconds and GB/s (bytes read + written)."""
    q = checks.random_quant(out_features, in_features, group_size, torch.device("cuda"))
    out = torch.empty(q.shape, dtype=torch.float16, device="cuda")
    elapsed_s = checks.time_cuda_s(lambda: dequant_int4(q, out), repeats)
    moved_nbytes = q.nbytes + out.numel() * out.element_size()
    gbps = moved_nbytes / elapsed_s / 1e9
    print(f"dequant_int4 {out_features}x{in_features} g{group_size}: {elapsed_s * 1e6:.1f} us, {gbps:.0f} GB/s")
    return {"elapsed_s": elapsed_s, "gbps": gbps, "moved_nbytes": moved_nbytes}


if __name__ == "__main__":
    print("max rel err", validate(96, 200, 32, torch.float16), validate(64, 130, 64, torch.bfloat16))
    if torch.cuda.is_available():
        bench()
