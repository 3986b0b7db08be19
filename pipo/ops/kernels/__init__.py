"""Kernels on packed int4 weights: CPU (numba ``njit``) and CUDA (numba-cuda, simulator-testable).

Each CUDA kernel file follows llm.c's ``dev/cuda`` layout: the kernel, a float64 reference, a
``validate`` check and a ``bench`` that prints achieved GB/s. :mod:`.cuda_adapter` hides what the
numba CUDA simulator lacks, so the same launch code runs under ``NUMBA_ENABLE_CUDASIM=1``.
"""
