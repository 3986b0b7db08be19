"""``pipo bench --workload speculate``: batch-1 speculative decoding vs plain streaming, one run.

One target engine (e.g. an offload store with ``--placement disk``: every pass streams the
weights from disk with O_DIRECT, so the page cache never serves them) generates each prompt of a
fixed JSONL set (``benchmarks/prompts/speculate.jsonl``: chat, summarization, code) greedily, once
plainly and once per draft kind, alternating per prompt, under the same plan; a model draft runs
twice: drafting inside the verify pass's DAG (overlapping its loads) and before it ("no overlap");
with ``budgets`` each draft also runs as a token tree of up to N tokens ("int4 tree N=16"). Per
variant: tok/s (generated tokens / wall seconds over all prompts), generated tokens per target
pass, draft ms per drafted token, verify-pass ms per drafted tokens in the pass (a chain's k, a
tree's node count; median), and link bytes per generated token (the
streamed blocks' stored bytes x target passes / generated tokens). Greedy speculation is exact, so
each variant's tokens are checked against plain's ("equal" column).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pipo.engine.speculate import SpecStats, Speculator
from pipo.errors import PipoError

DEFAULT_PROMPTS = Path("benchmarks/prompts/speculate.jsonl")


def read_prompt_set(path: Path) -> list[dict[str, str]]:
    """The JSONL prompt set: objects with ``kind`` and ``prompt``."""
    if not path.is_file():
        raise PipoError(f"--prompts {path}: no such file")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows or not all(isinstance(r.get("prompt"), str) for r in rows):
        raise PipoError(f"--prompts {path}: every line must be a JSON object with a prompt")
    return rows


def link_nbytes_per_pass(engine, plan) -> int:
    """Stored bytes of the blocks one target pass streams (a disk-tier embedding read by rows
    counts nothing: a pass reads a few KB of it)."""
    from pipo.engine.weights import embed_by_rows
    from pipo.plan import DISK

    size = getattr(engine.source, "block_nbytes", None)
    if not size:
        return 0
    by_rows = embed_by_rows(engine.source) and dict(plan.placement).get("embed") == DISK
    return sum(size(b) for b in plan.streamed() if not (by_rows and b == "embed"))


def run_speculate(engine, drafts: dict[str, Any], prompts: list[list[int]], gen_len: int,
                  k: int, save=None, budgets: tuple[int, ...] = ()) -> dict[str, Any]:
    """Plain and each draft on every prompt (alternating); one summary row per variant (each draft
    also as a tree per budget in ``budgets``). ``save(result)`` runs after each prompt with the
    summary so far (a killed run keeps it)."""
    plain = {"passes": 0, "generated": 0, "wall_s": 0.0, "tokens": []}
    specs = {}
    for name, draft in drafts.items():
        specs[name] = Speculator(engine, draft, k=k, k_max=2 * k)
        if hasattr(draft, "step_once"):  # the same draft with its steps outside the DAG
            specs[f"{name} (no overlap)"] = Speculator(engine, draft, k=k, k_max=2 * k,
                                                       overlap=False)
        for budget in budgets:
            specs[f"{name} tree N={budget}"] = Speculator(engine, draft, k=k, k_max=2 * k,
                                                          budget=budget)
    walls = dict.fromkeys(specs, 0.0)
    tokens: dict[str, list] = {name: [] for name in specs}
    engine.generate_ids(prompts[:1], 2)  # warm-up: places weights, compiles the step graphs
    for spec in specs.values():  # ... and the drafts' kernels; then the counters start at zero
        spec.generate_ids(prompts[:1], 4)
        spec.stats = SpecStats()
    plan = None
    for i, prompt in enumerate(prompts):
        print(f"prompt {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        gen = engine.generate_ids([prompt], gen_len)
        plain["wall_s"] += time.perf_counter() - t0
        plain["passes"] += gen.steps
        plain["generated"] += len(gen.tokens[0])
        plain["tokens"].append(gen.tokens[0])
        plan = gen.plan
        for name, spec in specs.items():
            t0 = time.perf_counter()
            tokens[name].append(spec.generate_ids([prompt], gen_len).tokens[0])
            walls[name] += time.perf_counter() - t0
        if save is not None:
            save(_summary(engine, plan, plain, specs, walls, tokens, i + 1, gen_len, k))
    return _summary(engine, plan, plain, specs, walls, tokens, len(prompts), gen_len, k)


def _summary(engine, plan, plain, specs, walls, tokens, n_prompts, gen_len, k) -> dict[str, Any]:
    per_pass = link_nbytes_per_pass(engine, plan)
    rows = [_row("plain", plain["generated"], plain["passes"], plain["wall_s"], per_pass, None,
                 True)]
    for name, spec in specs.items():
        rows.append(_row(name, spec.stats.generated, spec.stats.passes, walls[name], per_pass,
                         spec.stats, tokens[name] == plain["tokens"]))
    return {"rows": rows, "prompts": n_prompts, "gen_len": gen_len, "k": k,
            "link_nbytes_per_pass": per_pass,
            "placement": sorted({tier for _, tier in plan.placement})}


def _row(name: str, generated: int, passes: int, wall_s: float, per_pass: int,
         stats: SpecStats | None, equal: bool) -> dict[str, Any]:
    row = {"variant": name, "generated": generated, "passes": passes, "wall_s": round(wall_s, 3),
           "tok_s": generated / wall_s if wall_s else 0.0,
           "tokens_per_pass": generated / passes if passes else 0.0,
           "link_bytes_per_token": per_pass * passes / generated if generated else 0.0,
           "equal_to_plain": equal}
    if stats is not None:
        row.update(draft_ms_per_token=1e3 * stats.draft_s / max(stats.drafted, 1),
                   acceptance=stats.accepted / max(stats.drafted, 1),
                   verify_ms_by_k={k: 1e3 * statistics.median(v)
                                   for k, v in sorted(stats.verify_s.items())})
    return row


def format_table(result: dict[str, Any]) -> str:
    """The variants side by side (Markdown), speed-up against plain."""
    base = result["rows"][0]["tok_s"] or 1.0
    header = ("| variant | tok/s | x plain | tokens / target pass | draft acceptance | "
              "draft ms / token | verify-pass ms by drafted tokens | link MB / token | equal to plain |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        verify = ", ".join(f"{k}: {ms:.0f}" for k, ms in r.get("verify_ms_by_k", {}).items())
        lines.append(
            f"| {r['variant']} | {r['tok_s']:.2f} | {r['tok_s'] / base:.2f} | "
            f"{r['tokens_per_pass']:.2f} | {r.get('acceptance', 0):.2f} | "
            f"{r.get('draft_ms_per_token', 0):.1f} | {verify or '-'} | "
            f"{r['link_bytes_per_token'] / 1e6:.1f} | {r['equal_to_plain']} |")
    return "\n".join(lines)
