"""Fused int4 GEMV / skinny GEMM: ``y [B, out] = x [B, in] @ W^T`` for ``B <= MAX_BATCH``, reading the
packed codes, scales and mins directly (nothing is dequantized to memory).

Mapping: a block is ``(32 lanes, WARPS_PER_BLOCK warps)``; warp ``w`` owns output row
``blockIdx.x * WARPS_PER_BLOCK + w``. Lane ``l`` walks the row in steps of ``WORDS_PER_STEP`` int32
words (32 codes, 16 bytes read with one vector load), steps ``l, l + 32, ...``, so a warp reads 512
contiguous bytes per step. Each word's 8 codes are dequantized in registers (``q * scale + min`` in
fp32, as :func:`pipo.ops.quant.dequantize`) and multiplied with every activation row; the
``MAX_BATCH`` fp32 partial sums stay in registers (the batch loop has a constant trip count and is
unrolled). Lanes then combine through shared memory (the simulator has no warp shuffles): one
``syncthreads`` and lane ``b`` sums batch row ``b``.

The vector loads need the four words to share a group (``group_size % 32 == 0``) and each row to
start on 16 bytes (:func:`vector_ready`); other weights (group 8, 16 or 24, or an unaligned view) take
the same kernel built with one 4-byte word per step.

Activations are fp16, fp32, or bf16 passed as int16 bits; the output has the activations' dtype.

llm.c-style: :func:`reference` (float64), :func:`validate`, :func:`bench`; ``python -m`` runs both.
"""

from __future__ import annotations

import functools

import torch
from numba import cuda, float32
from numba.core import types

from pipo.ops.kernels import checks, dequant_int4
from pipo.ops.kernels.cuda_adapter import (LOAD_STORE, array_type, as_array, current_stream, device_function,
                                           device_scope, jit_kernel, kernel_device, load_words4,
                                           weight_arrays)
from pipo.ops.quant import CODES_PER_WORD, QuantTensor

MAX_BATCH = 8  # activation rows one launch handles; the register budget grows with it
WARPS_PER_BLOCK = 4  # output rows per block
LANES = 32
WORDS_PER_STEP = 4  # int32 words one lane reads per step on the vector path (16 bytes, 32 codes)
VECTOR_ALIGN_NBYTES = 16


def _make_step(load, words_per_step: int):
    """The device function doing one lane step: ``words_per_step`` words (4: one 16-byte load; 1: a
    4-byte load) times every activation row read through ``load``, added into ``acc``."""

    @device_function
    def fma_word(word, k0, n_codes, s, m, x, batch, acc):
        """acc[b] += sum over the word's first ``n_codes`` codes of (q * s + m) * x[b, k0 + i]."""
        for i in range(8):
            if i < n_codes:
                wv = float32((word >> (4 * i)) & 15) * s + m
                for b in range(MAX_BATCH):
                    if b < batch:
                        acc[b] += wv * load(x[b, k0 + i])

    @device_function
    def step4(qweight, n, w0, n_codes, s, m, x, batch, acc):
        """Words ``w0 .. w0 + 3`` of row n in one 16-byte load; ``n_codes`` of their codes count."""
        words = load_words4(qweight, n, w0)
        k0 = w0 * 8
        fma_word(words[0], k0, n_codes, s, m, x, batch, acc)
        fma_word(words[1], k0 + 8, n_codes - 8, s, m, x, batch, acc)
        fma_word(words[2], k0 + 16, n_codes - 16, s, m, x, batch, acc)
        fma_word(words[3], k0 + 24, n_codes - 24, s, m, x, batch, acc)

    @device_function
    def step1(qweight, n, w0, n_codes, s, m, x, batch, acc):
        """Word ``w0`` of row n; ``n_codes`` of its codes count."""
        fma_word(qweight[n, w0], w0 * 8, n_codes, s, m, x, batch, acc)

    return step4 if words_per_step == 4 else step1


def _make_kernel(load, store, words_per_step: int):
    """The GEMV kernel reading activations through ``load``, writing outputs through ``store`` and
    reading ``words_per_step`` weight words per lane step (see :func:`_make_step`)."""
    step = _make_step(load, words_per_step)
    codes_per_step = 8 * words_per_step

    def gemv(qweight, scales, mins, x, y, in_features, words_per_group):
        """y[b, n] = sum_k x[b, k] * (q[n, k] * scale + min): one warp per row n (see module doc)."""
        lane = cuda.threadIdx.x
        warp = cuda.threadIdx.y
        n = cuda.blockIdx.x * WARPS_PER_BLOCK + warp
        batch = x.shape[0]
        acc = cuda.local.array(MAX_BATCH, float32)
        for b in range(MAX_BATCH):
            acc[b] = float32(0.0)
        if n < y.shape[1]:
            n_steps = (in_features + codes_per_step - 1) // codes_per_step
            for i in range(lane, n_steps, LANES):
                w0 = i * words_per_step
                g = w0 // words_per_group  # one group for the whole step (see module doc)
                s = float32(scales[n, g])
                m = float32(mins[n, g])
                left = in_features - w0 * 8
                if left >= codes_per_step:  # a constant count: the code checks fold away
                    step(qweight, n, w0, codes_per_step, s, m, x, batch, acc)
                else:
                    step(qweight, n, w0, left, s, m, x, batch, acc)
        partial = cuda.shared.array((WARPS_PER_BLOCK, MAX_BATCH, LANES), float32)
        for b in range(MAX_BATCH):
            partial[warp, b, lane] = acc[b]
        cuda.syncthreads()
        if n < y.shape[1] and lane < batch:
            total = float32(0.0)
            for j in range(LANES):
                total += partial[warp, lane, j]
            y[lane, n] = store(total)

    return gemv


def kernel_function(dtype: torch.dtype, vector: bool = True):
    """The Python kernel function for activation / output ``dtype`` (fp16, bf16 or fp32), with 16-byte
    weight loads (``vector``) or 4-byte ones."""
    return _make_kernel(*LOAD_STORE[dtype], WORDS_PER_STEP if vector else 1)


def signature(dtype: torch.dtype):
    """The kernel's one numba signature for ``dtype``: (qweight, scales, mins, x, y, in, words/group)."""
    half, act = array_type(torch.float16), array_type(dtype)
    return types.void(array_type(torch.int32), half, half, act, act, types.int32, types.int32)


@functools.cache
def _kernel(dtype: torch.dtype, vector: bool = True):
    """The kernel for ``dtype``, compiled on first use for its one signature."""
    return jit_kernel(kernel_function(dtype, vector), [signature(dtype)])


def prepare(dtype: torch.dtype) -> None:
    """Compile the (vector) kernel for ``dtype`` now and load it into the current context."""
    _kernel(dtype)


@functools.cache
def _launcher(dtype: torch.dtype, vector: bool, out_features: int, stream):
    """The configured launch for one output width on one stream."""
    grid = -(-out_features // WARPS_PER_BLOCK)
    return _kernel(dtype, vector)[grid, (LANES, WARPS_PER_BLOCK), stream]


def vector_ready(q: QuantTensor) -> bool:
    """Whether 16-byte loads fit ``q``: four words per group and 16-byte aligned rows."""
    words_per_group = q.group_size // CODES_PER_WORD
    return words_per_group % WORDS_PER_STEP == 0 and q.qweight.data_ptr() % VECTOR_ALIGN_NBYTES == 0


def gemv_int4(x2: torch.Tensor, q: QuantTensor, out: torch.Tensor | None = None, *,
              weights: tuple | None = None) -> torch.Tensor:
    """``x2 [B, in] @ W^T -> [B, out]`` in ``x2.dtype`` (fp16, bf16 or fp32), ``1 <= B <= MAX_BATCH``.

    ``weights``: ``cuda_adapter.weight_arrays(q)`` made earlier (default: wrapped now).
    """
    batch, in_f = x2.shape
    if not 1 <= batch <= MAX_BATCH or in_f != q.shape[1]:
        raise ValueError(f"gemv_int4: x {tuple(x2.shape)} does not fit weight {q.shape} / batch <= {MAX_BATCH}")
    x2 = x2.contiguous()
    if out is None:
        out = torch.empty(batch, q.shape[0], dtype=x2.dtype, device=x2.device)
    with device_scope(x2.device):
        launch = _launcher(x2.dtype, vector_ready(q), q.shape[0], current_stream(x2.device))
        launch(*(weights or weight_arrays(q)), as_array(x2), as_array(out), in_f,
               q.group_size // CODES_PER_WORD)
    return out


# ---------------------------------------------------------------------------------------------------
# llm.c-style reference, check and benchmark


def reference(x2: torch.Tensor, q: QuantTensor) -> torch.Tensor:
    """float64 ``x2 @ W^T`` on the CPU, from the float64 dequantized weights."""
    return x2.detach().cpu().double() @ dequant_int4.reference(q).T


def validate(out_features: int, in_features: int, batch: int, group_size: int = 64,
             dtype: torch.dtype = torch.float16, seed: int = 0) -> float:
    """Run the kernel once into a NaN-poisoned output; return its relative error vs :func:`reference`.

    Raises ``AssertionError`` past :func:`checks.tolerance` (a NaN left anywhere counts as infinite).
    """
    device = kernel_device()
    q = checks.random_quant(out_features, in_features, group_size, device, seed)
    x2 = checks.random_activations(batch, in_features, dtype, device, seed + 1)
    out = torch.full((batch, out_features), float("nan"), dtype=dtype, device=device)
    gemv_int4(x2, q, out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    err = checks.relative_error(out, reference(x2, q))
    assert err <= checks.tolerance(dtype), f"gemv_int4 {q.shape} b{batch} g{group_size} {dtype}: rel err {err:.2e}"
    return err


def bench(out_features: int = 4096, in_features: int = 4096, batch: int = 1, group_size: int = 64,
          repeats: int = 20) -> dict:
    """Time the fp16 GEMV; print and return seconds and GB/s of packed weight bytes read."""
    q = checks.random_quant(out_features, in_features, group_size, torch.device("cuda"))
    x2 = checks.random_activations(batch, in_features, torch.float16, torch.device("cuda"))
    out = torch.empty(batch, out_features, dtype=torch.float16, device="cuda")
    elapsed_s = checks.time_cuda_s(lambda: gemv_int4(x2, q, out), repeats)
    gbps = q.nbytes / elapsed_s / 1e9
    print(f"gemv_int4 {out_features}x{in_features} b{batch} g{group_size}: {elapsed_s * 1e6:.1f} us, "
          f"{gbps:.0f} GB/s of packed weights")
    return {"elapsed_s": elapsed_s, "gbps": gbps, "weight_nbytes": q.nbytes}


if __name__ == "__main__":
    print("max rel err", validate(40, 200, 3, 32, torch.float16), validate(24, 130, 1, 64, torch.bfloat16))
    if torch.cuda.is_available():
        bench()
