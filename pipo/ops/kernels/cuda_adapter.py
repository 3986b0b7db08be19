"""What the numba CUDA kernels need from their surroundings, on a GPU and under the simulator alike.

On a GPU: torch tensors become device arrays with ``cuda.as_cuda_array(t, sync=False)`` (no copy, no
synchronization) and kernels launch on torch's current stream through ``cuda.external_stream``.
Under ``NUMBA_ENABLE_CUDASIM=1`` (checked once, here) neither exists: tensors live on the CPU and are
passed as numpy views, kernels run on the default stream, and the bit-cast device functions below use
numpy instead of libdevice.

bf16 never reaches numba as bf16: tensors are viewed as int16 and kernels convert with the device
functions :func:`load_bf16` / :func:`store_bf16` (a bf16 is the top half of an fp32).

16-byte accesses: :func:`load_words4` / :func:`store_words4` read / write four consecutive int32 of
a row as one vector instruction (``ld/st.global.v4.b32``; the caller guarantees 16-byte alignment),
and :func:`pack_f16x2` packs two fp16 into one int32. On a GPU they are LLVM intrinsics; under the
simulator, plain element accesses with the same results.

Devices: launches go on the current stream of the tensors' device (``cuda:N``), inside
:func:`device_scope` so numba uses that device's context.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from numba import config, cuda, float32, int16, int32
from numba.core import types

SIMULATOR = bool(config.ENABLE_CUDASIM)
TORCH_TO_NUMBA = {torch.float16: types.float16, torch.float32: types.float32,
                  torch.bfloat16: types.int16, torch.int32: types.int32}


def array_type(dtype: torch.dtype, ndim: int = 2) -> types.Array:
    """The numba type of a C-contiguous ``ndim`` array of torch ``dtype`` (bf16 -> int16 bits)."""
    return types.Array(TORCH_TO_NUMBA[dtype], ndim, "C")


def as_array(t: torch.Tensor):
    """A zero-copy kernel argument for the contiguous ``t`` (a CUDA device array; a numpy view under
    the simulator). Kernels are compiled for C-contiguous arrays only, so anything else is refused."""
    if not t.is_contiguous():
        raise ValueError(f"kernel arguments must be contiguous, got strides {t.stride()} for {tuple(t.shape)}")
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if SIMULATOR:
        return t.numpy()
    return cuda.as_cuda_array(t, sync=False)


def weight_arrays(q) -> tuple:
    """Kernel arguments for the tensors of the QuantTensor ``q``: (qweight, scales, mins). Wrapping
    costs microseconds per tensor: wrap once per weight view and reuse (see
    :class:`pipo.ops.int4_dispatch.Int4Workspace`)."""
    return as_array(q.qweight), as_array(q.scales), as_array(q.mins)


@functools.cache
def _external_stream(handle: int):
    """numba's view of the CUDA stream ``handle`` (one object per stream, reused)."""
    return cuda.external_stream(handle)


def current_stream(device: torch.device):
    """The stream to launch on: torch's current CUDA stream of ``device`` (simulator: 0)."""
    if SIMULATOR:
        return 0
    return _external_stream(torch.cuda.current_stream(device).cuda_stream)


def device_scope(device: torch.device):
    """A context in which numba wraps and launches on ``device`` (its primary context for
    ``cuda:N``, N > 0; numba's default, device 0, needs nothing)."""
    if SIMULATOR or not device.index:
        return contextlib.nullcontext()
    return cuda.gpus[device.index]


def kernel_device() -> torch.device:
    """Where tensors for a kernel launch must live: CUDA, or the CPU under the simulator."""
    return torch.device("cpu" if SIMULATOR else "cuda")


def jit_kernel(pyfunc, signatures: list):
    """Compile ``pyfunc`` now for every signature (the simulator ignores signatures)."""
    if SIMULATOR:
        return cuda.jit(pyfunc)
    return cuda.jit(signatures)(pyfunc)


def device_function(fn):
    """``fn`` as an inlined CUDA device function; under the simulator ``fn`` itself.

    The simulator's device-function wrapper swaps the defining module's ``cuda`` global under a
    per-module lock on every call; with a block's 128 Python threads calling a few device functions
    per weight word, that lock convoy made one small GEMV take from 1 s to minutes. Ours never
    touch ``cuda.*`` (the kernel does), so a plain call is the same computation.
    """
    if SIMULATOR:
        return fn
    return cuda.jit(device=True, inline=True)(fn)


if SIMULATOR:

    def _int_as_float(bits):
        return np.array(int(bits) & 0xFFFFFFFF, np.uint32).view(np.float32)[()]

    def _float_as_int(value):
        return int(np.array(value, np.float32).view(np.int32)[()])

else:
    from numba.cuda import libdevice

    _int_as_float = libdevice.int_as_float
    _float_as_int = libdevice.float_as_int

if SIMULATOR:

    def load_words4(array, row, col):
        """``array[row, col:col + 4]`` (int32) as a 4-tuple: one 16-byte load on a GPU."""
        return array[row, col], array[row, col + 1], array[row, col + 2], array[row, col + 3]

    def store_words4(array, row, col, w0, w1, w2, w3):
        """``array[row, col:col + 4] = w0..w3`` (int32): one 16-byte store on a GPU."""
        array[row, col], array[row, col + 1], array[row, col + 2], array[row, col + 3] = w0, w1, w2, w3

    def pack_f16x2(lo, hi):
        """Two float32 rounded to fp16 (nearest even), ``lo`` in the low half of an int32."""
        return int(np.array([lo, hi], np.float16).view(np.int32)[0])

else:
    from pipo.ops.kernels.cuda_vector import load_words4, pack_f16x2, store_words4  # noqa: F401


@device_function
def float_as_int(v):
    """The bits of a float32 as an int32."""
    return _float_as_int(v)


@device_function
def load_float(v):
    """An fp16 or fp32 element as float32."""
    return float32(v)


@device_function
def load_bf16(v):
    """A bf16 element, given as its int16 bits, as float32 (exact)."""
    return _int_as_float(int32(v) << 16)


@device_function
def store_f16(v):
    """float32 -> fp16 (round to nearest even)."""
    return types.float16(v)


@device_function
def store_f32(v):
    """float32 -> float32 (identity)."""
    return float32(v)


@device_function
def store_bf16(v):
    """float32 -> bf16 bits as int16, rounded to nearest even (NaN payloads are not preserved)."""
    bits = _float_as_int(v)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return int16(rounded)


LOAD_STORE = {torch.float16: (load_float, store_f16), torch.float32: (load_float, store_f32),
              torch.bfloat16: (load_bf16, store_bf16)}
