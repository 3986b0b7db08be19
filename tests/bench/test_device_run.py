"""``benchmarks/device_run.sh``: both stages' dry runs pass on a CPU, and bad set-ups get one message.

The dry run takes every step the GPU run takes on tiny shapes; steps that need CUDA print a SKIP
line saying so. Each step leaves a line in ``stages.jsonl`` and each benchmark its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "device_run.sh"
STEPS = {
    "smoke": (["kernel-gemv_int4", "kernel-dequant_int4", "gpu-tests", "link", "quick-traced",
               "W1-small"], ["link.json", "smoke_quick.json", "smoke_w1.json"]),
    "full": (["int4-bench", "quick", "W1", "W2", "W3", "W1-other-schedules"],
             ["quick.json", "w1.json", "w2.json", "w3.json", "w1_schedules.json"]),
    "spec": (["spec-tests", "spec-cost"], ["spec_cost.json"]),
}


def _device_run(*args: str, out: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": python, "PYTHONPATH": str(REPO)}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", ["smoke", "full", "spec"])
def test_the_dry_run_of_each_stage_passes_on_a_cpu(stage, tmp_path):
    done = _device_run("--dry-run", "--stage", stage, out=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "done: every step passed" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "stages.jsonl").read_text().splitlines()]
    names, outputs = STEPS[stage]
    assert [r["step"] for r in rows] == names
    for row in rows:
        assert row["result"] == "exit 0" or row["result"].startswith("skipped: needs CUDA"), row
        if row["result"] != "exit 0":
            assert f"SKIP {row['step']} (needs CUDA" in done.stdout
    for name in outputs:
        assert json.loads((tmp_path / name).read_text()), name


def test_missing_torch_missing_cuda_and_an_unknown_stage_each_say_so(tmp_path):
    no_torch = _device_run("--stage", "smoke", out=tmp_path, python="/bin/false")
    assert no_torch.returncode == 2 and "cannot import torch" in no_torch.stderr
    if not _cuda_available():
        no_cuda = _device_run("--stage", "full", out=tmp_path)
        assert no_cuda.returncode == 2 and "sees no CUDA device" in no_cuda.stderr
    bad_stage = _device_run("--dry-run", "--stage", "medium", out=tmp_path)
    assert bad_stage.returncode == 2 and "--stage smoke|full" in bad_stage.stderr


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
