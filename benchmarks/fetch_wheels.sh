#!/usr/bin/env bash
# Downloads the pure-Python wheels the GPU machine lacks (it has no internet) into the git-ignored
# benchmarks/wheels/, which a device call carries: run(..., carry=["benchmarks/wheels"]). The GPU
# image already has torch, numba, numba-cuda, networkx, safetensors, tokenizers, aiofiles,
# transformers and accelerate; only these three are missing there.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip download -q --no-deps -d wheels flexgen==0.1.8 attrs gguf==0.19.0
ls wheels
