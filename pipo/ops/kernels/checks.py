"""Shared pieces of the kernels' ``validate`` and ``bench`` functions: test weights, error, timing."""

from __future__ import annotations

import torch

from pipo.ops.quant import QuantTensor, pack_int4

BASE_TOLERANCE = 1e-3  # relative error allowed on the fp32 accumulation itself


def random_quant(out_features: int, in_features: int, group_size: int, device: torch.device,
                 seed: int = 0) -> QuantTensor:
    """A QuantTensor with uniform random codes, scales in [1e-3, 2e-2) and mins in [-0.2, 0)."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-in_features // group_size)
    codes = torch.randint(0, 16, (out_features, groups * group_size), generator=gen, dtype=torch.uint8)
    codes[:, in_features:] = 0  # padding codes are zero by convention
    scales = (torch.rand(out_features, groups, generator=gen) * 0.019 + 0.001).half()
    mins = (torch.rand(out_features, groups, generator=gen) * -0.2).half()
    q = QuantTensor(pack_int4(codes), scales, mins, (out_features, in_features), group_size)
    return q.to(device)


def random_activations(batch: int, in_features: int, dtype: torch.dtype, device: torch.device,
                       seed: int = 1) -> torch.Tensor:
    """Normal activations ``[batch, in_features]`` in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_features, generator=gen).to(dtype).to(device)


def tolerance(dtype: torch.dtype) -> float:
    """Allowed relative error of an output in ``dtype``: the base bound plus half an output ulp."""
    return BASE_TOLERANCE + torch.finfo(dtype).eps / 2


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |y - ref| / max |ref|`` in float64; ``inf`` when ``y`` holds a NaN (an unwritten output)."""
    y64 = y.detach().double().cpu()
    if bool(torch.isnan(y64).any()):
        return float("inf")
    ref64 = ref.detach().double().cpu()
    return float((y64 - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30))


def time_cuda_s(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` on the current CUDA stream, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def ptxas_resources(kernel_module, dtype: torch.dtype, cc: tuple[int, int] = (9, 0)) -> dict:
    """Registers and spill bytes per thread of a kernel module's kernel for ``dtype`` on ``cc``.

    Compiles to PTX with ``cuda.compile_ptx`` and assembles it with nvJitLink (``cuda.core``); needs no
    GPU, only the CUDA toolkit wheels (``pip install "numba-cuda[cu13]"``). Raises when they are missing.
    """
    import re

    from cuda.core import Linker, LinkerOptions, ObjectCode
    from numba import cuda

    ptx, _ = cuda.compile_ptx(kernel_module.kernel_function(dtype), kernel_module.signature(dtype), cc=cc)
    linker = Linker(ObjectCode.from_ptx(ptx.encode()), options=LinkerOptions(arch=f"sm_{cc[0]}{cc[1]}",
                                                                                verbose=True))
    linker.link("cubin")
    log = linker.get_info_log()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_store_nbytes": int(spills.group(1)), "spill_load_nbytes": int(spills.group(2))}
