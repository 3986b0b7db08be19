"""The smollm workload without its baseline: pipo's side of :mod:`pipo.bench.cpu` alone.

Used when transformers is not installed (the ``bench`` extra): pipo is measured exactly as in the
comparison (warm-up, then the median of ``repeats`` runs) and the baseline's cells say why they
are empty.
"""

from __future__ import annotations

from typing import Any

import torch

from pipo.bench import cpu


def run_pipo_alone(batches, gen_len: int, repeats: int, schedule: str,
                   why: str) -> dict[str, Any]:
    """pipo's rows of the smollm comparison; ``why`` fills the transformers side."""
    engine = cpu.open_pipo(schedule)
    try:
        rows = []
        for batch in batches:
            prompts = cpu.encode(engine, batch)
            cpu.time_pipo(engine, prompts, 4)  # warm-up: compiles the step graphs, places weights
            runs = [cpu.time_pipo(engine, prompts, gen_len) for _ in range(repeats)]
            rows.append({"batch": batch, "gen_len": gen_len, "repeats": repeats,
                         "pipo": cpu._summary(runs, batch, gen_len), "transformers": why})
    finally:
        engine.close()
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF; pipo " + engine.options.weights + ")",
            "schedule": schedule, "torch_threads": torch.get_num_threads(), "rows": rows}


def format_alone(result: dict[str, Any]) -> str:
    """pipo's rows as a Markdown table; the transformers column says why it is empty."""
    lines = ["| batch | new tokens | pipo tok/s | transformers tok/s |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['gen_len']} | {r['pipo']['tok_s']:.1f} | "
                     f"{r['transformers']} |")
    return "\n".join(lines)
