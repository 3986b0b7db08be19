"""Serving benchmark (issue 13): 16 concurrent streaming clients against 1, side by side.

What it does, in one run, on one machine, for each ``--placement`` (default: resident, host):
1. starts ``pipo serve`` (a subprocess, ``--max-batch`` = the clients, ``--threads``; for ``disk``
   on an offload store: ``--store``, or the model converted by ``pipo convert`` into a temporary
   directory) on a free port of 127.0.0.1 and warms it up (one request alone, then one per client
   at once: the step graphs of both batch shapes are compiled before timing);
2. **1 client**: ``--requests`` streamed completions one after another;
3. **N clients** (``--clients``, default 16): each streams ``--requests`` completions one after
   another, all clients at once (asyncio, the official ``openai`` client's AsyncOpenAI);
4. per side: aggregate decode tok/s = completion tokens (usage counts) / wall time of the side,
   time to first token (request sent -> first text chunk) and inter-token latency (gaps between
   text chunks) at p50 and p99; the ratio N-client / 1-client tok/s (targets: >= 5x resident,
   >= 8x with ``--placement host``); and how many N-client completions (greedy) equal the
   1-client completion of the same prompt.

Every request is bounded (``--max-tokens``), so a run is bounded: placements x (1 + clients) x
requests requests. Prints a table and writes JSON to ``--out``.

Example (from the repo root, the serve and test extras installed): ``PYTHONPATH=. python
benchmarks/bench_serve.py --out bench_serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from itertools import pairwise

PROMPTS = ["The history of the city begins", "Once upon a time, in a small village by the sea,",
           "def quicksort(items):", "The three most important ideas in physics are",
           "Dear team, thank you for", "A recipe for bread: first,",
           "The weather today is", "In 1969, the first people to walk on the moon"]


def disk_store(args, directory: str) -> str:
    """An offload store of the model for ``--placement disk``: ``--store``, or converted now."""
    if args.store:
        return args.store
    store = os.path.join(directory, "store")
    source = [args.model] if args.model else []
    if not source:
        from pipo.io.default_model import default_model_path

        source = [str(default_model_path())]
    subprocess.run([sys.executable, "-m", "pipo", "convert", *source, store], check=True,
                   stdout=subprocess.DEVNULL)
    return store


def start_server(args, placement: str, model: str | None) -> tuple[subprocess.Popen, str]:
    """``pipo serve`` on a free port; (process, base URL) once it listens."""
    model = ["--model", model] if model else []
    command = [sys.executable, "-m", "pipo", "serve", *model, "--port", "0", "--placement",
               placement, "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients),
               "--threads", str(args.threads), "--model-name", "bench", "--max-len", "512"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if match := re.search(r"http://127\.0\.0\.1:(\d+)/v1", line):
            return process, f"http://127.0.0.1:{match.group(1)}/v1"
        print(line, end="", file=sys.stderr)
    raise SystemExit(f"pipo serve exited with {process.wait()} before listening")


async def one_request(client, prompt: str, max_tokens: int) -> dict:
    """One streamed completion: tokens, time to first token, gaps between chunks."""
    sent = time.perf_counter()
    stamps, tokens, pieces = [], 0, []
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True,
                                             stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
            pieces.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"prompt": prompt, "text": "".join(pieces), "tokens": tokens,
            "ttft": stamps[0] - sent if stamps else None,
            "gaps": [b - a for a, b in pairwise(stamps)]}


async def client_loop(client, index: int, requests: int, max_tokens: int) -> list[dict]:
    """``requests`` completions one after another (prompts rotate with the client's index)."""
    return [await one_request(client, PROMPTS[(index + i) % len(PROMPTS)], max_tokens)
            for i in range(requests)]


async def side(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` clients at once, each ``requests`` requests: aggregate numbers."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
    start = time.perf_counter()
    runs = await asyncio.gather(*(client_loop(client, i, requests, max_tokens)
                                  for i in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    done = [r for run in runs for r in run]
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    gaps = [g for r in done for g in r["gaps"]]
    return {"clients": clients, "requests": len(done), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(gaps, 50), "itl_p99_s": pct(gaps, 99),
            "texts": [(r["prompt"], r["text"]) for r in done]}


def equal_to_alone(one: dict, many: dict) -> tuple[int, int]:
    """(equal, compared): the N-client texts of prompts the 1-client side also ran (greedy)."""
    alone = dict(one["texts"])
    pairs = [(alone[p], t) for p, t in many["texts"] if p in alone]
    return sum(a == t for a, t in pairs), len(pairs)


def pct(values: list[float], q: int) -> float | None:
    """The q-th percentile (nearest rank), None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def run_placement(args, placement: str, scratch: str) -> dict:
    """Both sides on one server of ``placement``."""
    model = disk_store(args, scratch) if placement == "disk" else args.model
    process, url = start_server(args, placement, model)
    try:
        asyncio.run(side(url, 1, 1, 8))                       # warm-up: the 1-row shape
        asyncio.run(side(url, args.clients, 1, 8))            # and the full batch's
        one = asyncio.run(side(url, 1, args.requests, args.max_tokens))
        many = asyncio.run(side(url, args.clients, args.requests, args.max_tokens))
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(120)
    equal, compared = equal_to_alone(one, many)
    return {"placement": placement, "one": one, "many": many, "ratio": many["tok_s"] / one["tok_s"],
            "equal_to_alone": equal, "compared": compared, "exit_status": status}


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def print_table(results: list[dict]) -> None:
    """The table: one line per placement and side."""
    print("| placement | clients | requests | tokens | wall s | tok/s | vs 1 client "
          "| TTFT p50/p99 ms | ITL p50/p99 ms | text = 1 client's |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in results:
        same = f"{r['equal_to_alone']}/{r['compared']}"
        for s in (r["one"], r["many"]):
            ratio = s["tok_s"] / r["one"]["tok_s"]
            print(f"| {r['placement']} | {s['clients']} | {s['requests']} | {s['tokens']} | "
                  f"{s['wall_s']:.1f} | {s['tok_s']:.1f} | {ratio:.2f}x | "
                  f"{ms(s['ttft_p50_s'])} / {ms(s['ttft_p99_s'])} | "
                  f"{ms(s['itl_p50_s'])} / {ms(s['itl_p99_s'])} | "
                  f"{'-' if s is r['one'] else same} |")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model path (default: the default model)")
    p.add_argument("--placement", nargs="+", default=["resident", "host"],
                   choices=["resident", "host", "disk"])
    p.add_argument("--store", default=None,
                   help="offload store for --placement disk (default: the model converted now)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="bench_serve.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        results = [run_placement(args, placement, scratch) for placement in args.placement]
    print_table(results)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "args": vars(args), "cpus": os.cpu_count(),
                   "load_average": os.getloadavg(), "results": results}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
