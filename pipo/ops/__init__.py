"""Model math: per-block pure functions, sampling, the int4 format and its kernels."""
