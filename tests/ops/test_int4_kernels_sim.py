"""The numba CUDA int4 kernels under the CUDA simulator, against their float64 references.

The simulator must be switched on before numba is first imported, and the rest of the suite imports
numba normally in this process; so every simulator case runs in one child process started with
``NUMBA_ENABLE_CUDASIM=1``, which calls each kernel module's ``validate`` (NaN-poisoned outputs,
relative error vs float64) and reports the errors as JSON. Shapes stay at N*K <= ~16k: each simulated
CUDA thread is a Python thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

# id -> (kernel module, validate kwargs); in_features deliberately not multiples of 8, 32 or the group
CASES = {
    "gemv_fp16_b3": ("gemv_int4", dict(out_features=40, in_features=200, batch=3, group_size=32, dtype="float16")),
    "gemv_bf16_b1": ("gemv_int4", dict(out_features=23, in_features=130, batch=1, group_size=64, dtype="bfloat16")),
    "gemv_fp32_b8": ("gemv_int4", dict(out_features=33, in_features=75, batch=8, group_size=32, dtype="float32")),
    "gemv_fp16_b5_g128": ("gemv_int4", dict(out_features=9, in_features=300, batch=5, group_size=128,
                                            dtype="float16")),
    "gemv_bf16_b7_long_row": ("gemv_int4", dict(out_features=5, in_features=1100, batch=7, group_size=64,
                                                dtype="bfloat16")),
    # group 16: two words per group, so the 4-byte-load variant of the kernel
    "gemv_fp16_b2_g16_scalar": ("gemv_int4", dict(out_features=6, in_features=90, batch=2, group_size=16,
                                                  dtype="float16")),
    "dequant_fp16": ("dequant_int4", dict(out_features=70, in_features=200, group_size=32, dtype="float16")),
    "dequant_bf16": ("dequant_int4", dict(out_features=21, in_features=130, group_size=64, dtype="bfloat16")),
    "dequant_fp32_g128": ("dequant_int4", dict(out_features=7, in_features=301, group_size=128,
                                               dtype="float32")),
}

CHILD = """
import json, sys, torch
from pipo.ops.kernels import dequant_int4, gemv_int4
from pipo.ops.kernels.cuda_adapter import SIMULATOR
assert SIMULATOR, "the CUDA simulator is not active"
results = {}
for case_id, (module, kwargs) in json.loads(sys.argv[1]).items():
    kwargs = dict(kwargs, dtype=getattr(torch, kwargs["dtype"]))
    try:
        results[case_id] = {"err": {"gemv_int4": gemv_int4, "dequant_int4": dequant_int4}[module].validate(**kwargs)}
    except AssertionError as exc:
        results[case_id] = {"failure": str(exc)}
from pipo.ops.kernels import checks  # the prefill path: dequantize, then F.linear
from pipo.ops.int4_dispatch import Int4Workspace, dequant_matmul
results["gemv_fp16_b2_g16_scalar"]["vector"] = gemv_int4.vector_ready(
    checks.random_quant(6, 90, 16, torch.device("cpu")))
q = checks.random_quant(19, 130, 64, torch.device("cpu"), seed=3)
x = checks.random_activations(11, 130, torch.float32, torch.device("cpu"))
y = dequant_matmul(x, q)
results["dequant_matmul_fp32"] = {"err": checks.relative_error(y, gemv_int4.reference(x, q))}
launches = []
kernel = dequant_int4.dequant_int4
dequant_int4.dequant_int4 = lambda *a, **k: launches.append(1) or kernel(*a, **k)
workspace = Int4Workspace()  # one block, two micro-batches: one dequantize pass
block = {"w": q}
workspace.begin_block(block)
y1 = dequant_matmul(x, q, workspace)
y2 = dequant_matmul(x[:5], q, workspace)
workspace.begin_block({"w": q})  # the next block: dequantized again
dequant_matmul(x, q, workspace)
results["dequant_once_per_block"] = {"launches": len(launches), "equal": bool(torch.allclose(y1[:5], y2)),
                                     "err": checks.relative_error(y1, gemv_int4.reference(x, q))}
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def sim_results() -> dict:
    """Every case's result from one simulator child process."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=240)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"simulator child failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("case_id", list(CASES))
def test_kernel_matches_float64_reference_under_simulator(sim_results, case_id):
    from pipo.ops.kernels.checks import tolerance

    result = sim_results[case_id]
    assert "failure" not in result, result.get("failure")
    dtype = getattr(torch, CASES[case_id][1]["dtype"])
    assert result["err"] <= tolerance(dtype)


def test_dequant_then_matmul_path_under_simulator(sim_results):
    assert sim_results["dequant_matmul_fp32"]["err"] <= 1e-3


def test_group_16_takes_the_4_byte_load_kernel(sim_results):
    assert sim_results["gemv_fp16_b2_g16_scalar"]["vector"] is False


def test_prefill_dequantizes_each_matrix_once_per_block_under_simulator(sim_results):
    result = sim_results["dequant_once_per_block"]
    assert result["launches"] == 2 and result["equal"] and result["err"] <= 1e-3


def _toolkit_or_skip() -> None:
    """Skip unless numba can build PTX and nvJitLink can assemble it (``numba-cuda[cu13]``)."""
    from pipo.ops.kernels.cuda_adapter import SIMULATOR

    if SIMULATOR:
        pytest.skip("NUMBA_ENABLE_CUDASIM is set in this process: no real compiler")
    try:
        from cuda.core import Linker  # noqa: F401
        from numba import cuda

        cuda.compile_ptx(lambda a: None, "void(float32[:])", cc=(9, 0))
    except Exception as exc:  # the toolkit wheels are optional: say what is missing
        pytest.skip(f"CUDA toolkit bits missing for compile_ptx (pip install 'numba-cuda[cu13]'): {exc}")


@pytest.mark.parametrize("module_name", ["gemv_int4", "dequant_int4"])
def test_kernels_compile_for_sm90_without_spills(module_name):
    _toolkit_or_skip()
    import importlib

    from pipo.ops.kernels.checks import ptxas_resources

    module = importlib.import_module(f"pipo.ops.kernels.{module_name}")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        res = ptxas_resources(module, dtype)
        assert res["spill_store_nbytes"] == 0 and res["spill_load_nbytes"] == 0, res
        assert res["registers"] <= 128, res
