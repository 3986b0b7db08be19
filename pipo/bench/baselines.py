"""The baselines pipo is measured against, run in the same process call as pipo's own rows.

The HF baselines need the ``bench`` extra (``pip install -e .[bench]``: transformers, accelerate);
:func:`not_installed` says when a baseline's packages are missing.

- ``flexgen``: FlexGen 0.1.8 (``pip install --no-deps flexgen==0.1.8`` + ``attrs``) through
  :mod:`pipo.bench.flexgen_shim` in a subprocess, its printed throughputs parsed. Its ``_DUMMY_``
  weights are all ones (rows say so in ``note``).
- ``accelerate``: the same random model as a transformers model in fp16, dispatched under the GPU
  cap with ``infer_auto_device_map`` + ``dispatch_model``, greedy ``generate``.
- ``transformers``: the same model on the CPU, greedy ``generate`` (fp32).
Every row has the throughput fields of docs/benchmarks.md; timings exclude model building and a
warm-up call.
HF timings split prefill from decode at the first generated token (a streamer's timestamps).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import torch

from pipo.bench import metrics
from pipo.bench.workloads import Workload

FLEXGEN_TIMEOUT_S = 600
EXIT_GRACE_S = 15
_FLEXGEN_FIELDS = {"prefill_tok_s": r"prefill throughput: ([\d.]+)",
                   "decode_tok_s": r"decode throughput: ([\d.]+)",
                   "total_tok_s": r"total throughput: ([\d.]+)",
                   "t_prefill_s": r"prefill latency: ([\d.]+)",
                   "t_decode_s": r"decode latency: ([\d.]+)",
                   "peak_gpu_gb": r"peak gpu mem: ([\d.]+) GB"}


BENCH_EXTRA = "pip install -e .[bench]"
# baseline -> (modules it imports, how to install them)
REQUIREMENTS = {"transformers": (("transformers", "accelerate"), BENCH_EXTRA),
                "accelerate": (("transformers", "accelerate"), BENCH_EXTRA),
                "flexgen": (("flexgen", "transformers"),
                            f"{BENCH_EXTRA} && pip install --no-deps flexgen==0.1.8 attrs")}


def not_installed(baseline: str) -> str | None:
    """``None`` when ``baseline``'s packages are importable here, else what to run to get them:
    ``"not installed: pip install -e .[bench]"``. They are optional (the ``bench`` extra)."""
    modules, command = REQUIREMENTS[baseline]
    return None if all(map(_importable, modules)) else f"not installed: {command}"


def _importable(module: str) -> bool:
    if module in sys.modules:  # imported already, or blocked (None)
        return sys.modules[module] is not None
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def flexgen_args(workload: Workload, offload_dir: str, log_file: str) -> list[str]:
    """``flexgen.flex_opt`` arguments for ``workload`` (BENCH.md's command)."""
    percent = workload.flexgen_percent()
    if percent is None:
        raise ValueError(f"FlexGen has no equivalent of workload {workload.id} "
                         f"({workload.shape}, placement {workload.placement})")
    args = ["--model", f"facebook/{workload.shape}", "--path", "_DUMMY_",
            "--offload-dir", offload_dir, "--percent", *map(str, percent),
            "--gpu-batch-size", str(workload.micro_batch),
            "--num-gpu-batches", str(workload.n_micro),
            "--prompt-len", str(workload.prompt_len), "--gen-len", str(workload.gen_len),
            "--log-file", log_file]
    return args + (["--compress-weight"] if workload.weights == "int4" else [])


def parse_flexgen_output(text: str) -> dict[str, float]:
    """The numbers FlexGen prints at the end of a run (missing ones are left out)."""
    found = {}
    for key, pattern in _FLEXGEN_FIELDS.items():
        matches = re.findall(pattern, text)
        if matches:
            found[key] = float(matches[-1])
    return found


def run_flexgen(workload: Workload, log_path: str | None = None,
                timeout_s: float = FLEXGEN_TIMEOUT_S) -> dict[str, Any]:
    """Run FlexGen on ``workload`` in a subprocess; a result row (with ``error`` on failure)."""
    row: dict[str, Any] = {"system": "flexgen-0.1.8", "schedule": None,
                           "note": "FlexGen _DUMMY_ weights are all ones"}
    with tempfile.TemporaryDirectory(prefix="pipo-flexgen-") as tmp:
        command = [sys.executable, "-m", "pipo.bench.flexgen_shim",
                   *flexgen_args(workload, tmp, os.path.join(tmp, "flexgen.log"))]
        output, code = _run_streaming(command, timeout_s)
    if log_path:
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(command)}\n{output}\n")
    row.update(parse_flexgen_output(output))
    if "peak_gpu_gb" in row:
        row["peak_gpu_nbytes"] = int(row.pop("peak_gpu_gb") * 2**30)  # FlexGen's GB is 2**30
    if "total_tok_s" not in row:
        tail = " | ".join(output.strip().splitlines()[-3:])
        row["error"] = f"flexgen exited with {code}: {tail}"
    return row


def _run_streaming(command: list[str], timeout_s: float) -> tuple[str, int | str]:
    """Run ``command``, collecting its output; killed at ``timeout_s``, or a grace period after it
    printed its final throughput (FlexGen's copy threads can keep a finished run alive)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    timers = [threading.Timer(timeout_s, proc.kill)]
    timers[0].start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "total throughput:" in line:
                timers.append(threading.Timer(EXIT_GRACE_S, proc.kill))
                timers[-1].start()
        code = proc.wait()
    finally:
        for timer in timers:
            timer.cancel()
        proc.kill()
        proc.wait()
    return "".join(lines), code


class _FirstTokenClock:
    """A transformers streamer that notes when the first new token arrives (end of prefill)."""

    def __init__(self):
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        """Called with the prompt first, then with every new token."""
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        """Generation finished."""


def hf_generate_timed(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, gen_len: int,
                      eos_token_id: int | None = None, pad_token_id: int = 0
                      ) -> tuple[torch.Tensor, float, float]:
    """Greedy ``generate`` of exactly ``gen_len`` tokens: (new ids, prefill s, decode s).

    With ``eos_token_id`` set, ``min_new_tokens`` keeps the model from stopping early.
    """
    clock = _FirstTokenClock()
    extra = {} if eos_token_id is None else {"min_new_tokens": gen_len}
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=gen_len, streamer=clock, pad_token_id=pad_token_id,
                             eos_token_id=eos_token_id, **extra)
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    end = time.perf_counter()
    first = clock.first_token_at or end
    return out[:, input_ids.shape[1]:], first - t0, end - first


def _hf_row(system: str, workload: Workload, batch: int, prefill_s: float,
            decode_s: float) -> dict[str, Any]:
    tput = metrics.throughput(batch, workload.prompt_len, workload.gen_len, prefill_s, decode_s)
    return {"system": system, "schedule": None, "batch": batch, "t_prefill_s": prefill_s,
            "t_decode_s": decode_s, **dataclasses.asdict(tput)}


def run_transformers(workload: Workload, prompts: list[list[int]]) -> dict[str, Any]:
    """transformers' CPU ``generate`` (fp32) on the workload's random weights."""
    from pipo.bench.pipo_runs import make_source
    from pipo.bench.hf_models import build_hf_model

    model = build_hf_model(make_source(workload), torch.float32)
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    hf_generate_timed(model, ids, mask, 2)  # warm-up
    _, prefill_s, decode_s = hf_generate_timed(model, ids, mask, workload.gen_len)
    return _hf_row("transformers-cpu", workload, len(prompts), prefill_s, decode_s)


def run_accelerate(workload: Workload, prompts: list[list[int]]) -> dict[str, Any]:
    """HF accelerate offload under the workload's GPU cap (fp16), greedy ``generate``."""
    from accelerate import dispatch_model, infer_auto_device_map

    from pipo.bench.hf_models import build_hf_model
    from pipo.bench.pipo_runs import make_source

    if not torch.cuda.is_available():
        raise RuntimeError("the accelerate baseline needs a CUDA device")
    model = build_hf_model(make_source(workload), torch.float16, own_copies=True)
    cap = workload.gpu_memory or torch.cuda.get_device_properties(0).total_memory
    device_map = infer_auto_device_map(model, max_memory={0: cap, "cpu": 512 * 2**30},
                                       no_split_module_classes=model._no_split_modules,
                                       dtype=torch.float16)
    model = dispatch_model(model, device_map=device_map, main_device=0)
    ids = torch.tensor(prompts, device="cuda:0")
    mask = torch.ones_like(ids)
    hf_generate_timed(model, ids, mask, 2)  # warm-up
    metrics.reset_peak_gpu(ids.device)
    _, prefill_s, decode_s = hf_generate_timed(model, ids, mask, workload.gen_len)
    row = _hf_row("hf-accelerate", workload, len(prompts), prefill_s, decode_s)
    row.update(peak_gpu_nbytes=metrics.peak_gpu_nbytes(ids.device),
               gpu_cap_nbytes=workload.gpu_memory,
               gpu_layers=sum(1 for d in device_map.values() if d == 0))
    return row
