"""What the numba CUDA kernels need from their surroundings, on a GPU and under the simulator alike.

On a GPU: torch tensors become device arrays with ``cuda.as_cuda_array(t, sync=False)`` (no copy, no
synchronization) and kernels launch on torch's current stream through ``cuda.external_stream``.
Under ``NUMBA_ENABLE_CUDASIM=1`` (checked once, here) neither exists: tensors live on the CPU and are
passed as numpy views, kernels run on the default stream, and the bit-cast device functions below use
numpy instead of libdevice.

bf16 never reaches numba as bf16: tensors are viewed as int16 and kernels convert with the device
functions :func:`load_bf16` / :func:`store_bf16` (a bf16 is the top half of an fp32).
"""

from __future__ import annotations

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


@functools.cache
def _external_stream(handle: int):
    """numba's view of the CUDA stream ``handle`` (one object per stream, reused)."""
    return cuda.external_stream(handle)


def current_stream():
    """The stream to launch on: torch's current CUDA stream (the simulator's default stream: 0)."""
    if SIMULATOR:
        return 0
    return _external_stream(torch.cuda.current_stream().cuda_stream)


def kernel_device() -> torch.device:
    """Where tensors for a kernel launch must live: CUDA, or the CPU under the simulator."""
    return torch.device("cpu" if SIMULATOR else "cuda")


def jit_kernel(pyfunc, signatures: list):
    """Compile ``pyfunc`` now for every signature (the simulator ignores signatures)."""
    if SIMULATOR:
        return cuda.jit(pyfunc)
    return cuda.jit(signatures)(pyfunc)


def _device(fn):
    """``fn`` as an inlined CUDA device function (a plain Python call under the simulator)."""
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


@_device
def load_float(v):
    """An fp16 or fp32 element as float32."""
    return float32(v)


@_device
def load_bf16(v):
    """A bf16 element, given as its int16 bits, as float32 (exact)."""
    return _int_as_float(int32(v) << 16)


@_device
def store_f16(v):
    """float32 -> fp16 (round to nearest even)."""
    return types.float16(v)


@_device
def store_f32(v):
    """float32 -> float32 (identity)."""
    return float32(v)


@_device
def store_bf16(v):
    """float32 -> bf16 bits as int16, rounded to nearest even (NaN payloads are not preserved)."""
    bits = _float_as_int(v)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return int16(rounded)


LOAD_STORE = {torch.float16: (load_float, store_f16), torch.float32: (load_float, store_f32),
              torch.bfloat16: (load_bf16, store_bf16)}
