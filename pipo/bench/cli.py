"""``pipo bench``: pipo's schedules and its baselines on one workload; prints a table, writes JSON.

Workloads (docs/benchmarks.md: ``W1``–``W7``, ``quick``) run on random-weight models, or
``smollm``: pipo against transformers on the CPU with the default real model
(:mod:`pipo.bench.cpu`). Baselines need the ``bench`` extra (``pip install -e .[bench]``); without
it pipo's own rows still run and each missing baseline's row says how to install it. Examples::

    pipo bench --device cpu                                  # smollm: pipo vs transformers, CPU
    pipo bench --device cuda --workload W1 --baselines flexgen --out w1.json --trace-dir traces
    pipo bench --device cpu --workload quick --shape tiny-opt --gen-len 4   # smoke test
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipo.errors import PipoError

BASELINES = ("flexgen", "accelerate", "transformers")
SCHEDULES = ("pipo", "flexgen", "sequential")
CPU_COPY_NBYTES = 1 << 28
DOC = "docs/benchmarks.md"
SMOLLM_GEN_LEN = 64
SMOLLM_BATCHES = (1, 8)
SPECULATE = "speculate"
SPECULATE_GEN_LEN = 32


def _choices_list(allowed: tuple[str, ...]):
    """argparse type: a comma-separated subset of ``allowed`` (empty string: none)."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        return items

    return parse


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``pipo bench`` on the ``pipo`` command's subparsers."""
    from pipo.bench.workloads import SHAPES, WORKLOAD_NAMES
    from pipo.cli_options import add_threads_option, parse_size, positive_int

    p = sub.add_parser("bench", help="benchmark pipo's schedules against baselines (table + JSON)",
                       description=__doc__.splitlines()[0].replace("``", ""),
                       epilog=f"Workloads, metrics and baselines: {DOC} in the pipo repository. "
                              "Baselines need: pip install -e .[bench]")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where pipo computes (default: %(default)s)")
    p.add_argument("--workload", choices=(*WORKLOAD_NAMES, SPECULATE), default="smollm",
                   help=f"a workload of {DOC} (W1-W7, quick: OPT-1.3B) on random weights, "
                        "smollm: the default real model on the CPU, or speculate: batch-1 "
                        "speculative decoding vs plain streaming on --model (default: %(default)s)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="run the workload on another model shape, e.g. tiny-opt for a smoke test "
                        "(default: the workload's)")
    p.add_argument("--schedules", type=_choices_list(SCHEDULES), default=list(SCHEDULES),
                   metavar="LIST",
                   help="comma-separated pipo schedules: pipo, flexgen, sequential; smollm runs "
                        "the first (default: all three)")
    p.add_argument("--baselines", type=_choices_list(BASELINES), default=None, metavar="LIST",
                   help="comma-separated baselines: flexgen, accelerate, transformers "
                        "(default: transformers for smollm, none otherwise)")
    p.add_argument("--gpu-memory", type=parse_size, default=None, metavar="SIZE",
                   help="GPU memory cap in bytes with a unit, e.g. 6GiB (default: the workload's)")
    _add_workload_overrides(p, positive_int)
    p.add_argument("--repeats", type=positive_int, default=3, metavar="N",
                   help="smollm: timed runs per side, alternating; the median counts "
                        "(default: %(default)s)")
    add_threads_option(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random prompts (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="write the results as JSON here (default: print the table only)")
    p.add_argument("--trace-dir", type=Path, default=None, metavar="DIR",
                   help="write a Chrome trace + timeline PNG of one decode step per schedule "
                        "(default: none)")
    p.add_argument("--log", type=Path, default=None, metavar="FILE",
                   help="append the baselines' own output (FlexGen) here (default: none)")
    p.add_argument("--baseline-timeout", type=positive_int, default=600, metavar="SECONDS",
                   help="stop a FlexGen run after this long (default: %(default)s)")
    _add_speculate_options(p)
    p.set_defaults(run=run)
    return p


def _add_speculate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculate workload")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="the target, e.g. an offload store (pipo convert) (default: the default "
                        "model)")
    g.add_argument("--placement", default="disk", choices=["auto", "resident", "host", "disk"],
                   help="where the target's blocks live (default: %(default)s)")
    g.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="JSONL prompt set (default: benchmarks/prompts/speculate.jsonl)")
    g.add_argument("--drafts", default="ngram,int4", metavar="LIST",
                   help="comma-separated draft kinds: ngram, int4, or a model path "
                        "(default: %(default)s)")
    g.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                   help="initial draft tokens per round (default: %(default)s)")
    g.add_argument("--draft-group-size", type=int, default=128, metavar="N",
                   help="int4 draft group size (default: %(default)s)")
    g.add_argument("--draft-budget", type=_budgets, default=(), metavar="N[,N...]",
                   help="also run each draft as a token tree of up to N tokens per round, as "
                        "variants 'KIND tree N=N' (default: chains only)")
    g.add_argument("--no-chat", action="store_true",
                   help="feed the prompts as they are, not in the model's chat template")
    g.add_argument("--weight-slots", type=int, default=2, metavar="N",
                   help="the target's weight slots: blocks that may load ahead of compute, also "
                        "while a model draft drafts (default: %(default)s)")


def _budgets(text: str) -> tuple[int, ...]:
    """``--draft-budget``'s comma-separated positive budgets."""
    try:
        budgets = tuple(int(part) for part in text.split(","))
    except ValueError:
        budgets = ()
    if not budgets or min(budgets) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 16 or 8,16, got {text!r}")
    return budgets


def _add_workload_overrides(p: argparse.ArgumentParser, positive_int) -> None:
    overrides = (("--prompt-len", "TOKENS", "prompt tokens per sequence", "512; quick: 256"),
                 ("--gen-len", "TOKENS", "new tokens per sequence",
                  f"32; quick: 16; smollm: {SMOLLM_GEN_LEN}"),
                 ("--batch", "N", "sequences per step",
                  f"32; W5: 1; quick: 8; smollm: {' and '.join(map(str, SMOLLM_BATCHES))}"),
                 ("--micro-batch", "N", "rows per micro-batch", "8; W5: 1; quick: 4"))
    for flag, metavar, what, default in overrides:
        p.add_argument(flag, type=positive_int, default=None, metavar=metavar,
                       help=f"{what} (default: the workload's: {default})")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; print the table; write JSON when asked."""
    import torch

    from pipo.bench.report import environment, write_json
    from pipo.cli_options import set_threads
    from pipo.cli_paths import check_output_file

    for path, flag in ((args.out, "--out"), (args.log, "--log")):
        if path is not None:
            check_output_file(path, flag)
    set_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PipoError("--device cuda was asked for but no CUDA device is available")
    document: dict[str, Any] = {"meta": environment(args.device), "rows": []}

    def save() -> None:
        if args.out:
            write_json(document, args.out)

    if args.workload == "smollm":
        document.update(_run_smollm(args))
    elif args.workload == SPECULATE:
        document.update(_run_speculate(args))
    else:
        _run_workload(args, document, save)
    save()
    if args.out:
        print(f"wrote {args.out}")
    return 0 if not any(r.get("error") for r in document["rows"]) else 1


def _run_speculate(args: argparse.Namespace) -> dict[str, Any]:
    from pipo.bench import speculate
    from pipo.cli_options import open_engine_with
    from pipo.engine import EngineOptions
    from pipo.engine.drafts import make_draft
    from pipo.engine.text import encode_prompt

    rows = speculate.read_prompt_set(args.prompts or speculate.DEFAULT_PROMPTS)
    gen_len = args.gen_len or SPECULATE_GEN_LEN
    options = EngineOptions(device=args.device, placement=args.placement,
                            n_weight_slots=args.weight_slots)
    with open_engine_with(args.model, options) as engine:
        prompts = [encode_prompt(engine, r["prompt"], not args.no_chat, None) for r in rows]
        max_len = max(map(len, prompts)) + gen_len + 4 * args.draft_tokens + max(
            args.draft_budget, default=0)
        drafts = {kind: make_draft(kind, engine, max_len, group_size=args.draft_group_size)
                  for kind in args.drafts.split(",")}
        try:
            result = speculate.run_speculate(engine, drafts, prompts, gen_len, args.draft_tokens,
                                             save=lambda partial: _save_partial(args, partial),
                                             budgets=args.draft_budget)
        finally:
            for draft in drafts.values():
                draft.close()
    print(speculate.format_table(result))
    return {"workload": {"id": SPECULATE, **{k: v for k, v in result.items() if k != "rows"}},
            "rows": result["rows"]}


def _save_partial(args: argparse.Namespace, partial: dict[str, Any]) -> None:
    from pipo.bench.report import write_json

    if args.out:
        write_json({"partial": True, **partial}, args.out)


def _run_smollm(args: argparse.Namespace) -> dict[str, Any]:
    from pipo.bench import cpu
    from pipo.bench.baselines import not_installed

    if args.device != "cpu":
        raise PipoError("the smollm workload compares with transformers on the CPU; "
                        "use --device cpu (GPU workloads: W1..W7, quick)")
    baselines = ["transformers"] if args.baselines is None else args.baselines
    if baselines != ["transformers"]:
        raise PipoError("the smollm workload has one baseline: transformers")
    batches = (args.batch,) if args.batch else SMOLLM_BATCHES
    gen_len, schedule = args.gen_len or SMOLLM_GEN_LEN, (args.schedules or ["pipo"])[0]
    missing = not_installed("transformers")
    if missing:
        from pipo.bench.cpu_alone import format_alone, run_pipo_alone

        result = run_pipo_alone(batches, gen_len, args.repeats, schedule, missing)
        print(format_alone(result))
    else:
        result = cpu.run_smollm(batches, gen_len, args.repeats, schedule)
        print(cpu.format_table(result))
    return {"workload": {"id": "smollm", **{k: v for k, v in result.items() if k != "rows"}},
            "comparisons": result["rows"]}


def _run_workload(args: argparse.Namespace, document: dict[str, Any], save) -> None:
    """pipo's schedules, then the baselines, on a random-weight workload; rows land in
    ``document["rows"]`` and ``save()`` runs after each, so a killed run keeps what it measured."""
    import dataclasses

    import torch

    from pipo.bench import metrics, pipo_runs
    from pipo.bench.report import format_rows
    from pipo.bench.workloads import resolve

    _check_something_runs(args)
    workload = resolve(args.workload, shape=args.shape, prompt_len=args.prompt_len,
                       gen_len=args.gen_len, batch=args.batch, micro_batch=args.micro_batch,
                       gpu_memory=args.gpu_memory)
    device = torch.device(args.device)
    link_gbps = metrics.copy_gbps(device, CPU_COPY_NBYTES if device.type == "cpu" else 1 << 30)
    document.update(workload=dataclasses.asdict(workload), link_gbps=link_gbps)
    print(f"{workload.id}: {workload.shape}, prompt {workload.prompt_len}, gen {workload.gen_len}, "
          f"batch {workload.micro_batch}x{workload.n_micro}, {workload.note}; "
          f"copy bandwidth {link_gbps:.1f} GB/s", flush=True)
    rows = document["rows"]

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        save()

    pipo_runs.run_schedules(workload, args.device, args.schedules,
                            trace_dir=str(args.trace_dir) if args.trace_dir else None,
                            link_gbps=link_gbps, seed=args.seed, on_row=add)
    for name in args.baselines or []:
        add(_baseline_row(name, workload, args))
    print(format_rows(rows))
    for row in rows:
        if row.get("skipped"):
            print(f"- {row['system']}: {row['skipped']}")


def _check_something_runs(args: argparse.Namespace) -> None:
    """With no pipo schedule asked for, every asked baseline must be installed: else one line."""
    from pipo.bench.baselines import not_installed

    missing = {name: not_installed(name) for name in args.baselines or []}
    if not args.schedules and all(missing.values()):
        raise PipoError("nothing to run: " + "; ".join(f"{name} is {why}"
                                                       for name, why in missing.items())
                        if missing else "nothing to run: no schedules and no baselines")


def _baseline_row(name: str, workload, args: argparse.Namespace) -> dict[str, Any]:
    """One baseline's row: ``skipped`` when its packages are missing, ``error`` when it cannot
    run here or fails."""
    from pipo.bench import baselines
    from pipo.bench.pipo_runs import error_row, random_prompts

    missing = baselines.not_installed(name)
    if missing:
        return {"system": name, "schedule": None, "skipped": missing}
    print(f"baseline {name} ...", flush=True)
    try:
        if name == "flexgen":
            if args.device != "cuda":
                raise RuntimeError("FlexGen runs on CUDA only")
            return baselines.run_flexgen(workload, str(args.log) if args.log else None,
                                         args.baseline_timeout)
        prompts = random_prompts(workload, workload.prompt_len, args.seed)
        if name == "accelerate":
            return baselines.run_accelerate(workload, prompts)
        return baselines.run_transformers(workload, prompts)
    except Exception as exc:  # noqa: BLE001 - a failed baseline is a row, not a lost run
        return error_row(name, None, exc)
