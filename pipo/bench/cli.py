"""``pipo bench``: pipo's schedules and its baselines on one workload; prints a table, writes JSON.

Workloads are BENCH.md's (``W1``–``W7``, ``quick``) on random-weight models, or ``smollm``: pipo
against transformers on the CPU with the default real model (:mod:`pipo.bench.cpu`). Examples::

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
    from pipo.cli_options import parse_size, positive_int

    p = sub.add_parser("bench", help="benchmark pipo's schedules against baselines (table + JSON)",
                       description=__doc__.splitlines()[0].replace("``", ""))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--workload", choices=WORKLOAD_NAMES, default="smollm",
                   help="BENCH.md workload, quick (OPT-1.3B) or smollm (CPU, real model)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="run the workload on another model shape (e.g. tiny-opt for a smoke test)")
    p.add_argument("--schedules", type=_choices_list(SCHEDULES), default=list(SCHEDULES),
                   help="comma-separated pipo schedules (default: all three)")
    p.add_argument("--baselines", type=_choices_list(BASELINES), default=None,
                   help="comma-separated baselines: flexgen, accelerate, transformers "
                        "(default: transformers for smollm, none otherwise)")
    p.add_argument("--gpu-memory", type=parse_size, default=None, metavar="SIZE",
                   help="GPU memory cap (default: the workload's, e.g. 6GiB)")
    for flag in ("--gen-len", "--prompt-len", "--batch", "--micro-batch"):
        p.add_argument(flag, type=positive_int, default=None)
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="smollm: alternating timed runs per side (median)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--trace-dir", type=Path, default=None,
                   help="write a Chrome trace + timeline PNG of one decode step per schedule")
    p.add_argument("--log", type=Path, default=None, help="append baseline output (FlexGen) here")
    p.add_argument("--baseline-timeout", type=positive_int, default=600, metavar="SECONDS",
                   help="stop a FlexGen run after this long")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; print the table; write JSON when asked."""
    import torch

    from pipo.bench.report import environment, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PipoError("--device cuda was asked for but no CUDA device is available")
    document: dict[str, Any] = {"meta": environment(args.device), "rows": []}

    def save() -> None:
        if args.out:
            write_json(document, args.out)

    if args.workload == "smollm":
        document.update(_run_smollm(args))
    else:
        _run_workload(args, document, save)
    save()
    if args.out:
        print(f"wrote {args.out}")
    return 0 if not any(r.get("error") for r in document["rows"]) else 1


def _run_smollm(args: argparse.Namespace) -> dict[str, Any]:
    from pipo.bench import cpu

    if args.device != "cpu":
        raise PipoError("the smollm workload compares with transformers on the CPU; "
                        "use --device cpu (GPU workloads: W1..W7, quick)")
    baselines = ["transformers"] if args.baselines is None else args.baselines
    if baselines != ["transformers"]:
        raise PipoError("the smollm workload has one baseline: transformers")
    batches = (args.batch,) if args.batch else (1, 8)
    result = cpu.run_smollm(batches, args.gen_len or 64, args.repeats,
                            (args.schedules or ["pipo"])[0])
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


def _baseline_row(name: str, workload, args: argparse.Namespace) -> dict[str, Any]:
    """One baseline's row; an ``error`` row when it cannot run here or fails."""
    from pipo.bench import baselines
    from pipo.bench.pipo_runs import error_row, random_prompts

    print(f"baseline {name} ...", flush=True)
    try:
        if name == "flexgen":
            if args.device != "cuda":
                raise RuntimeError("FlexGen runs on CUDA only")
            if not baselines.flexgen_available():
                raise RuntimeError("flexgen is not installed (pip install --no-deps "
                                   "flexgen==0.1.8 attrs)")
            return baselines.run_flexgen(workload, str(args.log) if args.log else None,
                                         args.baseline_timeout)
        prompts = random_prompts(workload, workload.prompt_len, args.seed)
        if name == "accelerate":
            return baselines.run_accelerate(workload, prompts)
        return baselines.run_transformers(workload, prompts)
    except Exception as exc:  # noqa: BLE001 - a failed baseline is a row, not a lost run
        return error_row(name, None, exc)
