"""The cost side of speculative decoding on a big shape: verify-pass time vs k, draft time per token.

Issue 12's GPU part: a random OPT-6.7B-shaped target (fp16) streamed from host RAM under a
device-memory cap (default 6 GiB, the int4 draft's resident bytes counted inside it), batch 1.
Measured: the plain decode pass (median period), and for each fixed k (no adaptation) the verify
pass with the draft's k steps in its DAG (median over rounds) and the draft's milliseconds per
drafted token. Random weights make acceptance meaningless here, so the speed-up is a
**projection**: tokens per pass from a per-token acceptance ``--acceptance`` measured on real
weights elsewhere (SmolLM2 on the CPU, int4 g128 drafts: 0.56, benchmarks/RESULTS.md), i.e.
``(1 - a^(k+1)) / (1 - a)`` tokens per pass, times plain pass / verify pass.

``python benchmarks/bench_spec_cost.py --out spec_cost.json`` on a GPU;
``--dry-run`` anywhere: a tiny shape on the CPU, same steps.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

MIB = 2**20


def projected_tokens_per_pass(acceptance: float, k: int) -> float:
    """Expected tokens one verify pass of a k-token chain yields (accepted drafts + the target's
    own token) when each draft token is accepted with probability ``acceptance``."""
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def draft_nbytes(spec, group_size: int) -> int:
    """Resident bytes of the int4 draft: int4 layers, fp16 embedding and head."""
    from pipo.plan import estimate_block_nbytes

    return sum(estimate_block_nbytes(spec, 2, group_size).values())


def plain_pass_s(engine, prompt: list[int], gen_len: int) -> float:
    """Median period between decode steps of a plain greedy generation."""
    stamps: list[float] = []
    engine.generate_ids([prompt], gen_len, on_step=lambda _: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def k_row(engine, draft, prompt: list[int], k: int, rounds: int, plain_s: float,
          acceptance: float) -> dict:
    """Verify-pass and draft cost at a fixed k, and the projected speed-up."""
    from pipo.engine.speculate import SpecStats, Speculator

    spec = Speculator(engine, draft, k=k, adaptive=False)
    spec.generate_ids([prompt], k + 2)  # warm-up: this k's step graphs
    spec.stats = SpecStats()
    spec.generate_ids([prompt], rounds * (k + 1))
    verify = spec.stats.verify_s.get(k, [])
    verify_s = statistics.median(verify) if verify else float("nan")
    tokens = projected_tokens_per_pass(acceptance, k)
    return {"k": k, "verify_ms": 1e3 * verify_s, "verify_rounds": len(verify),
            "verify_over_plain": verify_s / plain_s,
            "draft_ms_per_token": 1e3 * spec.stats.draft_s / max(spec.stats.drafted, 1),
            "projected_tokens_per_pass": tokens,
            "projected_speedup": tokens * plain_s / verify_s}


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write JSON after each row."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default=None, help="model shape (default opt-6.7b; tiny-llama with "
                                                 "--dry-run)")
    p.add_argument("--device-memory", type=int, default=6144, metavar="MIB",
                   help="device cap for target + draft, MiB (default 6144)")
    p.add_argument("--ks", default="1,2,4,8,16", help="draft lengths (default 1,2,4,8,16)")
    p.add_argument("--rounds", type=int, default=3, help="verify rounds per k (default 3)")
    p.add_argument("--group-size", type=int, default=128, help="int4 draft group (default 128)")
    p.add_argument("--acceptance", type=float, default=0.56,
                   help="per-token acceptance for the projection (default 0.56: SmolLM2, CPU)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--out", default="spec_cost.json", help="JSON output (default spec_cost.json)")
    p.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU")
    args = p.parse_args(argv)
    import torch

    from pipo.bench.random_model import RandomModel
    from pipo.bench.report import environment, write_json
    from pipo.bench.workloads import SHAPES
    from pipo.engine import Engine, EngineOptions
    from pipo.engine.drafts import int4_draft

    device = "cpu" if args.dry_run else "cuda"
    spec = SHAPES[args.shape or ("tiny-llama" if args.dry_run else "opt-6.7b")]
    ks = [int(k) for k in args.ks.split(",")]
    draft_bytes = draft_nbytes(spec, args.group_size)
    target_cap = args.device_memory * MIB - draft_bytes
    if target_cap <= 0 and not args.dry_run:
        print(f"the int4 draft alone ({draft_bytes / MIB:.0f} MiB) exceeds --device-memory",
              file=sys.stderr)
        return 2
    options = EngineOptions(device=device, dtype="float16" if device == "cuda" else "float32",
                            placement="host",
                            device_memory=None if args.dry_run else target_cap)
    prompt = torch.randint(spec.vocab_size, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    doc = {"meta": environment(device), "shape": spec.name, "device_memory_mib": args.device_memory,
           "draft_mib": draft_bytes / MIB, "acceptance": args.acceptance,
           "projection": "tokens/pass from --acceptance, not measured on these random weights",
           "rows": []}
    max_len = args.prompt_len + args.rounds * (max(ks) + 1) + max(ks) + 4
    with Engine(RandomModel(spec), options) as engine:
        draft = int4_draft(engine, args.group_size, max_len)
        try:
            plain_s = plain_pass_s(engine, prompt, 6)
            doc["plain_pass_ms"] = 1e3 * plain_s
            write_json(doc, args.out)
            print(f"{spec.name}: plain pass {1e3 * plain_s:.1f} ms, draft {draft_bytes / MIB:.1f} "
                  f"MiB resident\n{'k':>3}{'verify ms':>11}{'x plain':>9}{'draft ms/tok':>14}"
                  f"{'tok/pass*':>11}{'speed-up*':>11}", flush=True)
            for k in ks:
                row = k_row(engine, draft, prompt, k, args.rounds, plain_s, args.acceptance)
                doc["rows"].append(row)
                write_json(doc, args.out)
                print(f"{k:>3}{row['verify_ms']:>11.1f}{row['verify_over_plain']:>9.2f}"
                      f"{row['draft_ms_per_token']:>14.2f}{row['projected_tokens_per_pass']:>11.2f}"
                      f"{row['projected_speedup']:>10.2f}x", flush=True)
        finally:
            draft.close()
    print(f"* projected with acceptance {args.acceptance} per token (not measured here)")
    write_json(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
