"""llama.cpp as a baseline, through llama-cpp-python (optional extra: ``pip install -e .[llama]``).

Two ways to time it:
- in this process: :func:`load` then :func:`generate_timed` (first-token and decode times of a greedy
  run on a loaded model; what a decode-speed comparison wants);
- in a fresh process, like a user starting a program: :func:`first_token_in_subprocess` runs
  ``python -m pipo.bench.llama_cpp MODEL PROMPT``, which imports llama_cpp, loads the GGUF, prints the
  first token as soon as it exists, then one JSON line of its in-process timings. The parent times
  spawn -> first token on stdout, the same way ``bench_startup.py`` times ``pipo generate``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

INSTALL_HINT = "not installed: pip install -e .[llama]"


def available() -> bool:
    """Whether llama-cpp-python can be imported."""
    return importlib.util.find_spec("llama_cpp") is not None


def load(model_path: str, *, n_threads: int | None = None, n_ctx: int = 512) -> Any:
    """A ``llama_cpp.Llama`` over ``model_path`` (CPU, quiet, ``n_threads`` default: every core)."""
    from llama_cpp import Llama

    return Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(),
                 n_gpu_layers=0, verbose=False)


def generate_timed(llm: Any, prompt: str, n_tokens: int, on_first=None) -> dict[str, float]:
    """Greedy ``n_tokens`` after ``prompt``: ``first_token_s`` (prompt processing + one token),
    ``decode_s`` (the rest) and ``n_tokens`` produced. ``on_first(text)`` runs at the first token."""
    start = time.perf_counter()
    first_s, count = None, 0
    for chunk in llm(prompt, max_tokens=n_tokens, temperature=0.0, stream=True):
        count += 1
        if first_s is None:
            first_s = time.perf_counter() - start
            if on_first is not None:
                on_first(chunk["choices"][0]["text"])
    total_s = time.perf_counter() - start
    first_s = total_s if first_s is None else first_s
    return {"first_token_s": first_s, "decode_s": total_s - first_s, "n_tokens": count}


def sequential_timed(llm: Any, prompts: list[list[int]], n_tokens: int) -> dict[str, float]:
    """Greedy ``n_tokens`` after each token-id prompt, one prompt after another (the Python API
    runs one sequence at a time), never stopping at eos: ``wall_s`` of all, and the summed
    ``prefill_s`` (prompt + first token) and ``decode_s`` (the rest)."""
    prefill_s = decode_s = 0.0
    start = time.perf_counter()
    for prompt in prompts:
        t0 = first = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
            if i == 0:
                first = time.perf_counter()
            if i + 1 == n_tokens:
                break
        prefill_s += first - t0
        decode_s += time.perf_counter() - first
    return {"wall_s": time.perf_counter() - start, "prefill_s": prefill_s, "decode_s": decode_s}


def first_token_in_subprocess(model_path: str, prompt: str, *, timeout_s: float = 300) -> dict[str, float]:
    """Spawn a fresh Python that loads the model and makes one token; ``wall_s`` is spawn -> first
    token on its stdout, the others (``import_s``, ``load_s``, ``first_token_s``) its own timings."""
    command = [sys.executable, "-m", "pipo.bench.llama_cpp", str(model_path), prompt]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdout.readline()  # the first token's line
        wall_s = time.perf_counter() - start
        out = proc.stdout.read()  # not communicate(): it would skip what readline buffered
        err = proc.stderr.read()
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed: {err.decode(errors='replace').strip()[-500:]}")
    return {"wall_s": wall_s, **json.loads(out.decode().strip().splitlines()[-1])}


def _main(argv: list[str]) -> int:
    """The child of :func:`first_token_in_subprocess`: MODEL PROMPT."""
    start = time.perf_counter()
    import llama_cpp  # noqa: F401 - timed: part of what a fresh process pays

    imported = time.perf_counter()
    llm = load(argv[0])
    loaded = time.perf_counter()
    timing = generate_timed(llm, argv[1], 1, on_first=lambda text: print(repr(text), flush=True))
    print(json.dumps({"import_s": imported - start, "load_s": loaded - imported,
                      "first_token_s": timing["first_token_s"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
