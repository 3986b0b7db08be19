"""pipo's CPU paths against llama.cpp on the default model: paired, alternating runs.

Systems (same GGUF, greedy, eos ignored so every run makes exactly the asked tokens):
- ``pipo 4-bit``: the default CPU path (torch's int4 kernel on the kept Q4_1 blocks, Q8_0 head);
- ``pipo dense``: ``--dtype float32`` (the GGUF dequantized to fp32);
- ``llama.cpp``: llama-cpp-python (built from source without AVX-512/AMX; see pipo.bench.llama_cpp).

Measurements, each system in turn, ``--repeats`` rounds, medians reported:
- ``decode b1``: tok/s of the decode steps after one prompt (first token excluded);
- ``batch 8``: total tok/s of 8 prompts x ``--gen-len`` (wall of the whole generation); llama.cpp's
  Python API runs one sequence at a time, so its row is the 8 prompts one after another;
- ``prefill``: tok/s of one ``--prefill-len``-token prompt (the first step alone).
Ops per step: every ATen op dispatched in one batch-1 decode step (torch profiler), by name.

Usage: ``PYTHONPATH=. python benchmarks/bench_cpu_llama.py --out bench_cpu_llama.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections import Counter

import torch

from pipo.bench import cpu, llama_cpp

TEXT = "/usr/share/common-licenses/GPL-3"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-llama", action="store_true", help="pipo only")
    p.add_argument("--pipo", nargs="+", default=["pipo 4-bit:", "pipo dense:dtype=float32"],
                   metavar="NAME:OPTS", help="pipo systems: a name and EngineOptions fields "
                   "(key=value,...), e.g. 'pipo int4:weights=int4' (default: %(default)s)")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


class PipoSystem:
    """One pipo engine on the default model with eos ignored."""

    def __init__(self, name: str, **options):
        from pipo.engine import Engine, EngineOptions
        from pipo.io.source import open_model

        self.name = name
        self.engine = Engine(cpu._NoEos(open_model(None)), EngineOptions(device="cpu", **options))

    def decode(self, prompt: list[int], n: int) -> float:
        """Decode tok/s after ``prompt`` (the first token, i.e. the prefill, excluded)."""
        gen = self.engine.generate_ids([prompt], n)
        return (gen.steps - 1) / gen.decode_s

    def batch(self, prompts: list[list[int]], n: int) -> float:
        """Total tok/s of ``prompts`` together."""
        t0 = time.perf_counter()
        gen = self.engine.generate_ids(prompts, n)
        return sum(len(t) for t in gen.tokens) / (time.perf_counter() - t0)

    def prefill(self, prompt: list[int]) -> float:
        """Prompt tok/s of one first step."""
        return len(prompt) / self.engine.generate_ids([prompt], 1).prefill_s

    def tokens(self, prompt: list[int], n: int) -> list[int]:
        """Greedy tokens (for the report)."""
        return self.engine.generate_ids([prompt], n).tokens[0]

    def close(self) -> None:
        """Release the engine."""
        self.engine.close()


class LlamaSystem:
    """llama.cpp through llama-cpp-python; ``generate`` never stops at eos."""

    name = "llama.cpp"

    def __init__(self, n_threads: int, n_ctx: int):
        from llama_cpp import Llama

        from pipo.io.default_model import default_model_path

        self.llm = Llama(model_path=str(default_model_path()), n_ctx=n_ctx, n_batch=512,
                         n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=0,
                         verbose=False)

    def _run(self, prompt: list[int], n: int) -> tuple[float, float]:
        self.llm.reset()
        t0 = time.perf_counter()
        first = None
        for i, _ in enumerate(self.llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
            if i == 0:
                first = time.perf_counter()
            if i + 1 == n:
                break
        return first - t0, time.perf_counter() - first

    def decode(self, prompt: list[int], n: int) -> float:
        """Decode tok/s after ``prompt`` (first token excluded)."""
        _, decode_s = self._run(prompt, n)
        return (n - 1) / decode_s

    def batch(self, prompts: list[list[int]], n: int) -> float:
        """Total tok/s of ``prompts`` one after another."""
        t0 = time.perf_counter()
        for p in prompts:
            self._run(p, n)
        return len(prompts) * n / (time.perf_counter() - t0)

    def prefill(self, prompt: list[int]) -> float:
        """Prompt tok/s (prompt processing + first token)."""
        first_s, _ = self._run(prompt, 1)
        return len(prompt) / first_s

    def close(self) -> None:
        """Release the model."""
        self.llm.close()


def _top_level_ops(prof) -> Counter:
    """ATen ops called from Python (not from inside another ATen op), by name."""
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::")
                   and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def ops_per_step(system: PipoSystem, prompt: list[int]) -> dict:
    """Top-level ATen ops of one batch-1 decode step (torch profiler): a 2-token generation
    (prefill + one decode step) minus a 1-token one (the prefill)."""
    from torch.profiler import ProfilerActivity, profile

    system.engine.generate_ids([prompt], 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        system.engine.generate_ids([prompt], 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof1:
        system.engine.generate_ids([prompt], 1)
    counts = _top_level_ops(prof)
    counts.subtract(_top_level_ops(prof1))
    return {"total": sum(counts.values()), "top": dict(counts.most_common(15))}


def measure(systems, prompt, prompts8, long_prompt, args) -> dict:
    """Alternating rounds; medians of each measurement per system."""
    runs = {s.name: {"decode_b1": [], "batch8": [], "prefill": []} for s in systems}
    for s in systems:  # warm-up
        s.decode(prompt, 4)
        s.prefill(long_prompt)
    for _ in range(args.repeats):
        for s in systems:
            runs[s.name]["decode_b1"].append(s.decode(prompt, args.gen_len))
        for s in systems:
            runs[s.name]["batch8"].append(s.batch(prompts8, args.gen_len // 2))
        for s in systems:
            runs[s.name]["prefill"].append(s.prefill(long_prompt))
    return {name: {k: {"median": statistics.median(v), "all": [round(x, 2) for x in v]}
                   for k, v in r.items()} for name, r in runs.items()}


def main(argv=None) -> int:
    """Run the comparison; print a table; write JSON."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    pipos = [PipoSystem(name, **_options(opts)) for name, opts in
             (spec.split(":", 1) for spec in args.pipo)]
    tok = pipos[0].engine.tokenizer
    prompt = tok.encode(cpu.PROMPTS[0])
    prompts8 = cpu.encode(pipos[0].engine, 8)
    with open(TEXT, encoding="utf-8") as f:
        long_prompt = tok.encode(f.read())[:args.prefill_len]
    systems = list(pipos)
    if not args.skip_llama and llama_cpp.available():
        systems.append(LlamaSystem(threads, 2 * args.prefill_len))
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "threads": threads, "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
              "gen_len": args.gen_len, "prefill_len": args.prefill_len,
              "ops_per_step": {s.name: ops_per_step(s, prompt) for s in pipos},
              "tokens": {s.name: s.tokens(prompt, 24) for s in pipos},
              "results": measure(systems, prompt, prompts8, long_prompt, args)}
    for s in systems:
        s.close()
    print_table(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


def _options(text: str) -> dict:
    """``"dtype=float32,weights=int4"`` -> EngineOptions keyword arguments."""
    return dict(item.split("=", 1) for item in text.split(",") if item)


def print_table(result: dict) -> None:
    """Markdown table, ratios against llama.cpp when it ran."""
    res = result["results"]
    base = res.get("llama.cpp")
    print("| system | decode b1 tok/s | batch 8 tok/s | prefill tok/s | ops/step |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        cells = []
        for k in ("decode_b1", "batch8", "prefill"):
            v = r[k]["median"]
            cells.append(f"{v:.1f}" + (f" ({v / base[k]['median']:.2f}x)" if base else ""))
        ops = result["ops_per_step"].get(name, {}).get("total", "-")
        print(f"| {name} | {' | '.join(cells)} | {ops} |")
    print(f"threads {result['threads']}, load avg {result['load_avg']}")
    for name, t in result["tokens"].items():
        print(f"{name} tokens: {t}")


if __name__ == "__main__":
    raise SystemExit(main())
