"""``pipo probe`` (measure this machine) and ``pipo plan`` (choose and explain a plan)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipo.cli_options import add_engine_options, add_model_option, positive_int
from pipo.cli_paths import check_output_file
from pipo.errors import PipoError


def add_probe(sub) -> None:
    """Register ``pipo probe``."""
    p = sub.add_parser("probe", help="measure this machine for the planner (seconds)",
                       description="Measure link, disk, compute and scheduler speeds and save them "
                                   "as a JSON profile in the user's cache directory "
                                   "(~/.cache/pipo), reused until the hardware changes.")
    p.add_argument("--device", default="cpu",
                   help="device to measure: cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype to time (default: float32 on cpu, float16 on cuda)")
    p.add_argument("--disk-dir", type=Path, default=None, metavar="DIR",
                   help="directory on the file system to read from, e.g. an offload store's "
                        "(default: the system's temporary directory)")
    p.add_argument("--refresh", action="store_true",
                   help="measure again even if a profile of this machine is cached")
    p.set_defaults(run=run_probe)


def add_plan(sub) -> None:
    """Register ``pipo plan``."""
    p = sub.add_parser("plan", help="choose a plan under memory caps and explain it",
                       description="Search placements, KV place, micro-batches, slots and "
                                   "schedules; replay each step graph on a virtual clock with "
                                   "this machine's profile; print the fastest plan and the next "
                                   "best. See docs/planning.md.")
    add_model_option(p, positional=True)
    g = p.add_argument_group("workload")
    g.add_argument("--batch", type=positive_int, default=None, metavar="N",
                   help="sequences generated together (default: 1 for --goal latency, else 8)")
    g.add_argument("--prompt-len", type=positive_int, default=128, metavar="TOKENS",
                   help="prompt tokens per sequence (default: %(default)s)")
    g.add_argument("--new-tokens", type=positive_int, default=64, metavar="TOKENS",
                   help="tokens generated per sequence (default: %(default)s)")
    g.add_argument("--goal", choices=["throughput", "latency"], default="throughput",
                   help="throughput: most tokens/s for the batch; latency: the fastest decode "
                        "step for one sequence (batch 1) (default: %(default)s)")
    g.add_argument("--timeline", type=Path, default=None, metavar="FILE",
                   help="also write the chosen plan's predicted decode step: .png (timeline "
                        "picture) or .json (Chrome trace) (default: none)")
    g.add_argument("--measure", action="store_true",
                   help="also run the chosen plan for a few decode steps and print the measured "
                        "step time next to the prediction; with --timeline, the measured step "
                        "goes to FILE-measured.png/.json beside the predicted one")
    add_engine_options(p)
    p.set_defaults(run=run_plan)


def _dtype_name(args) -> str:
    return args.dtype or ("float16" if args.device.startswith("cuda") else "float32")


def run_probe(args: argparse.Namespace) -> int:
    """Measure (or show the cached) profile of this machine."""
    from pipo.planner.probe import probe
    from pipo.planner.profile import (
        hardware_key,
        load_profile,
        profile_path,
        save_profile,
    )

    dtype = _dtype_name(args)
    profile = None if args.refresh else load_profile(args.device, dtype)
    if profile is None:
        if args.disk_dir is not None and not args.disk_dir.is_dir():
            raise PipoError(f"--disk-dir {args.disk_dir}: no such directory")
        profile = probe(args.device, dtype, str(args.disk_dir) if args.disk_dir else None)
        path = save_profile(profile)
        print(f"measured this machine; profile written to {path}")
    else:
        path = profile_path(hardware_key(args.device, dtype))
        print(f"cached profile {path} (pipo probe --refresh measures again)")
    print(describe_profile(profile))
    return 0


def describe_profile(profile) -> str:
    """The profile's numbers, one per line, with units."""
    from pipo.planner.costs import GEMM_MIN_ROWS

    c = profile.compute
    return "\n".join([
        f"device      {profile.device} ({profile.dtype})",
        (f"h2d         {profile.h2d_pinned_bps / 1e9:.2f} GB/s pinned, "
        f"{profile.h2d_pageable_bps / 1e9:.2f} GB/s pageable"),
        (f"d2h         {profile.d2h_pinned_bps / 1e9:.2f} GB/s pinned, "
        f"{profile.d2h_pageable_bps / 1e9:.2f} GB/s pageable"),
        (f"disk        {profile.disk_block_s * 1e3:.2f} ms per block + "
        f"{profile.disk_read_bps / 1e9:.2f} GB/s (the engine's store reads, page cache bypassed)"),
        (f"compute     {c.fixed_s * 1e6:.1f} us per op + {c.s_per_weight_byte * 1e12:.2f} ps per "
        f"weight byte + {c.s_per_flop * 1e12:.2f} ps per flop + "
        f"{c.s_per_attn_flop * 1e12:.2f} ps per attention flop + {c.s_per_elem * 1e9:.2f} ns "
        f"per activation element + {c.s_per_gemm_weight_byte * 1e12:.2f} ps per weight byte "
        f"of products of {GEMM_MIN_ROWS} rows or more"),
        (f"overhead    {profile.task_overhead_s * 1e6:.1f} us per task, "
        f"{profile.step_overhead_s * 1e3:.2f} ms host work per step")])


def run_plan(args: argparse.Namespace) -> int:
    """Plan, then print the chosen plan, its prediction and the alternatives."""
    from pipo.cli_options import open_engine
    from pipo.planner.explain import explain
    from pipo.planner.profile import load_profile

    if args.timeline is not None:
        if args.timeline.suffix.lower() not in (".png", ".json"):
            raise PipoError(f"--timeline {args.timeline}: use a .png or .json file")
        check_output_file(args.timeline, "--timeline")
    batch = args.batch or (1 if args.goal == "latency" else 8)
    max_len = args.prompt_len + args.new_tokens
    profile = load_profile(args.device, _dtype_name(args))
    if profile is None:
        from pipo.planner.probe import probe
        from pipo.planner.profile import save_profile

        print("no profile of this machine yet: measuring it first (pipo probe)")
        profile = probe(args.device, _dtype_name(args))
        save_profile(profile)
    with open_engine(args) as engine:
        if max_len > engine.spec.max_positions:
            raise PipoError(f"--prompt-len + --new-tokens ({max_len}) exceeds the model's "
                            f"context of {engine.spec.max_positions} tokens")
        print(explain(engine, batch, args.prompt_len, args.new_tokens, profile,
                      timeline=args.timeline, measure=args.measure))
    return 0
