"""The planner's accuracy and quality, measured: two tables and a JSON document.

1. Prediction error: for each configuration (model, placement, KV place, batch / micro-batch,
   link cap) a short generation runs traced; the measured decode step (the median period between
   two decode steps, sampling included) is set against the simulator's prediction for the same
   plan and position, with a profile measured just before that configuration (the machine is
   shared: a profile and a run taken together see the same neighbours); for an offload store its
   disk costs are timed on the store's own blocks first, as the planner does
   (``pipo.planner.probe_disk.with_store_reads``). Error = |predicted - measured| / measured.
2. Plan quality: for each workload (batch 1, 8, 32 under a device-memory cap and a link cap) the
   planner's plan and a grid of manual plans (KV on the device or in host RAM, whole batch or
   micro-batches, 2 or 3 weight slots) run side by side; tokens/s = batch * new tokens /
   (prefill + decode time). The grid's best manual plan and the planner's plan are then measured
   again, alternately (``--rematch`` rounds), and the ratio of their medians is reported: the
   grid's best is the largest of a dozen noisy runs, so its grid number alone is biased upward.

The profile is measured first in this process (``pipo probe``'s measurements, not the cache), with
the same torch thread count as the runs. ``--picture DIR`` also writes the predicted and the
measured timeline of one decode step (the docs' picture).

Usage: ``python benchmarks/bench_planner.py --out planner.json [--threads 1] [--quick]``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 2**20
PROMPT = [1, 504, 3458, 282, 4649, 314, 23, 1137, 16, 9, 42, 77] * 3  # 36 tokens


@dataclass
class Config:
    """One measured configuration (engine options and the batch)."""

    name: str
    model: str  # "smollm2" | "random-1g" | "store"
    batch: int
    options: dict = field(default_factory=dict)


def configs(quick: bool) -> list[Config]:
    """The prediction-error grid (>= 12 configurations; ``quick``: the first 4)."""
    grid = [
        Config("smollm2 resident b1", "smollm2", 1, {"placement": "resident"}),
        Config("smollm2 host b1", "smollm2", 1, {"placement": "host"}),
        Config("smollm2 host kv-host b4 m2", "smollm2", 4,
               {"placement": "host", "kv_offload": True, "micro_batch": 2}),
        Config("smollm2 host kv-host b8 m4 2GB/s", "smollm2", 8,
               {"placement": "host", "kv_offload": True, "micro_batch": 4, "link_gbps": 2.0}),
        Config("smollm2 host b8 m1", "smollm2", 8, {"placement": "host", "micro_batch": 1}),
        Config("smollm2 host b1 0.5GB/s", "smollm2", 1, {"placement": "host", "link_gbps": 0.5}),
        Config("smollm2 host b2 m1 8GB/s 3 slots", "smollm2", 2,
               {"placement": "host", "micro_batch": 1, "link_gbps": 8.0, "n_weight_slots": 3}),
        Config("smollm2 host kv-disk b4", "smollm2", 4, {"placement": "host", "kv_disk_dir": "TMP"}),
        Config("smollm2 disk kv-host b1", "store", 1, {"placement": "disk", "kv_offload": True}),
        Config("random-1g resident b1", "random-1g", 1, {"placement": "resident"}),
        Config("random-1g host b1", "random-1g", 1, {"placement": "host"}),
        Config("random-1g host kv-host b4 m2 1GB/s", "random-1g", 4,
               {"placement": "host", "kv_offload": True, "micro_batch": 2, "link_gbps": 1.0}),
        Config("random-1g host b8 m8 4GB/s", "random-1g", 8,
               {"placement": "host", "link_gbps": 4.0}),
    ]
    return grid[:4] if quick else grid


def open_source(kind: str, cache: dict):
    """The weight source of ``kind`` (made once per run)."""
    if kind not in cache:
        from pipo.bench.cpu import _NoEos
        from pipo.io.source import open_model

        if kind == "smollm2":
            cache[kind] = _NoEos(open_model(None))
        elif kind == "store":
            from pipo.io.store import convert

            out = Path(tempfile.mkdtemp(prefix="pipo-bench-planner-")) / "store"
            cache[kind] = _NoEos(open_model(convert(open_model(None), out, weights="fp32")))
        else:
            from pipo.bench.random_model import RandomModel
            from pipo.io.spec import ModelSpec

            spec = ModelSpec("llama", vocab_size=32000, hidden=1024, n_layers=16, n_heads=16,
                             n_kv_heads=4, head_dim=64, ffn=2816, max_positions=2048)
            cache[kind] = RandomModel(spec)
    return cache[kind]


def measure(source, options: dict, batch: int, new_tokens: int, plan=None) -> dict:
    """Run one traced generation; decode seconds per step, tok/s and the last decode step."""
    from pipo.engine import Engine, EngineOptions

    opts = {"dtype": "float32", **options}  # what the prediction costs (dtype_nbytes=4): the CPU
    # default for a 4-bit GGUF is otherwise the bf16 4-bit path
    if opts.get("kv_disk_dir") == "TMP":
        opts["kv_disk_dir"] = tempfile.gettempdir()
    with Engine(source, EngineOptions(trace=True, **opts)) as engine:
        if plan is not None:
            engine.plan_for = lambda b, m: plan  # a manual plan, exactly as given
        stamps: list[float] = []
        gen = engine.generate_ids([PROMPT] * batch, new_tokens,
                                  on_step=lambda _: stamps.append(time.perf_counter()))
    periods = [b - a for a, b in itertools.pairwise(stamps)]
    return {"plan": gen.plan, "decode_s": statistics.median(periods), "prefill_s": gen.prefill_s,
            "tok_s": batch * gen.steps / (gen.prefill_s + gen.decode_s),
            "last_step": gen.step_stats[-1] if gen.step_stats else None, "steps": gen.steps}


def predicted_decode(source, plan, profile, options: dict, new_tokens: int):
    """The simulator's decode step at the middle of the run."""
    from graphs import DECODE
    from pipo.engine.weights import embed_by_rows
    from pipo.planner.estimate import predict_step

    int4 = options.get("weights") == "int4"
    link = options.get("link_gbps")
    return predict_step(source.spec, plan, profile, DECODE,
                        start=len(PROMPT) + new_tokens // 2, t=1, dtype_nbytes=4,
                        int4_group=64 if int4 else None, link_bps=link * 1e9 if link else None,
                        embed_rows=embed_by_rows(source))


def error_table(profile, quick: bool, new_tokens: int, sources: dict, picture: Path | None,
                reprobe: bool = True):
    """Rows of the prediction-error table (and the docs' picture from the third config)."""
    rows = []
    from pipo.planner.probe import probe
    from pipo.planner.probe_disk import with_store_reads

    for i, cfg in enumerate(configs(quick)):
        source = open_source(cfg.model, sources)
        profile = probe("cpu", "float32") if reprobe else profile
        if hasattr(source, "read_block_into"):  # as the planner costs a store: on its own blocks
            profile = with_store_reads(profile, source)
        got = measure(source, cfg.options, cfg.batch, new_tokens)
        pred = predicted_decode(source, got["plan"], profile, cfg.options, new_tokens)
        err = abs(pred.step_s - got["decode_s"]) / got["decode_s"]
        rows.append({"config": cfg.name, "measured_ms": 1e3 * got["decode_s"],
                     "link_gbps_profile": profile.h2d_pinned_bps / 1e9,
                     "predicted_ms": 1e3 * pred.step_s, "error": err,
                     "bottleneck": pred.bottleneck})
        print(f"{cfg.name:<38}{rows[-1]['measured_ms']:>10.1f}{rows[-1]['predicted_ms']:>11.1f}"
              f"{100 * err:>8.1f}%  {pred.bottleneck}", flush=True)
        if picture is not None and i == 2 and got["last_step"] is not None:
            write_pictures(picture, pred.stats, got["last_step"], cfg.name)
    return rows


def write_pictures(directory: Path, predicted, measured, name: str) -> None:
    """Predicted and measured timelines of one decode step, one PNG each."""
    from pipo.runtime.trace import timeline_png

    directory.mkdir(parents=True, exist_ok=True)
    timeline_png(predicted, directory / "planning_predicted.png",
                 title=f"predicted decode step: {name}")
    timeline_png(measured, directory / "planning_measured.png",
                 title=f"measured decode step: {name}")


def manual_plans(spec, batch: int, max_len: int, cap: int):
    """The manual grid under ``cap``: KV device/host x whole batch/quarters x 1/2/3 slots."""
    from pipo.errors import PlanError
    from pipo.plan import estimate_block_nbytes, make_plan

    sizes = estimate_block_nbytes(spec, 4)
    for kv in (False, True):
        for micro in sorted({batch, max(1, batch // 4)}, reverse=True):
            for slots in (1, 2, 3):
                try:
                    yield (f"kv-{'host' if kv else 'device'} m{micro} s{slots}",
                           make_plan(spec, sizes, batch=batch, max_len=max_len, micro_batch=micro,
                                     device_memory=cap, kv_offload=kv, n_weight_slots=slots))
                except PlanError:
                    continue


def rematch(source, options: dict, batch: int, new_tokens: int, planner_plan, manual_plan,
            rounds: int) -> tuple[float, float]:
    """Median tok/s of the planner's plan and of the grid's best manual plan, measured alternately
    ``rounds`` times: the grid's best is the largest of many noisy runs, so its own number is
    biased upward (and the planner's single run came minutes earlier)."""
    planner, manual = [], []
    for _ in range(rounds):
        planner.append(measure(source, options, batch, new_tokens, plan=planner_plan)["tok_s"])
        manual.append(measure(source, {"link_gbps": options["link_gbps"]}, batch, new_tokens,
                              plan=manual_plan)["tok_s"])
    return statistics.median(planner), statistics.median(manual)


def quality_table(profile, quick: bool, new_tokens: int, sources: dict, cap: int, gbps: float,
                  rounds: int = 3):
    """Rows of the plan-quality table: planner vs the best manual plan, per workload (the two
    re-measured side by side ``rounds`` times, :func:`rematch`)."""
    from pipo.engine import Engine, EngineOptions
    from pipo.planner.engine_plan import plan_engine

    source = open_source("smollm2", sources)
    rows = []
    for batch in ((1, 8) if quick else (1, 8, 32)):
        max_len = len(PROMPT) + new_tokens
        options = {"device_memory": cap, "link_gbps": gbps}
        with Engine(source, EngineOptions(dtype="float32", **options)) as engine:
            t0 = time.perf_counter()
            chosen = plan_engine(engine, batch, max_len, prompt_len=len(PROMPT),
                                 new_tokens=new_tokens, profile=profile).best
            plan_s = time.perf_counter() - t0
        planner = measure(source, options, batch, new_tokens, plan=chosen.plan)
        grid = dict(manual_plans(source.spec, batch, max_len, cap))
        manual = {name: measure(source, {"link_gbps": gbps}, batch, new_tokens, plan=plan)
                  for name, plan in grid.items()}
        if not manual:
            print(f"batch {batch}: no manual plan fits the cap", flush=True)
            continue
        best_name = max(manual, key=lambda n: manual[n]["tok_s"])
        planner_tok_s, best_tok_s = rematch(source, options, batch, new_tokens, chosen.plan,
                                            grid[best_name], rounds)
        ratio = planner_tok_s / best_tok_s
        from pipo.planner.explain import summarize

        same = [n for n, plan in grid.items() if plan == chosen.plan and not chosen.int4]
        rows.append({"batch": batch, "planner_plan": summarize(chosen),
                     "same_as_manual": same[0] if same else None,
                     "planner_tok_s": planner_tok_s, "planner_grid_tok_s": planner["tok_s"],
                     "planner_predicted_tok_s": chosen.estimate.tok_s, "plan_s": plan_s,
                     "best_manual": best_name, "best_manual_tok_s": best_tok_s,
                     "best_manual_grid_tok_s": manual[best_name]["tok_s"], "rematch_rounds": rounds,
                     "ratio": ratio, "manual": {n: m["tok_s"] for n, m in manual.items()}})
        print(f"batch {batch:<4}{planner_tok_s:>10.2f}{chosen.estimate.tok_s:>11.2f}  "
              f"{best_name:<22}{best_tok_s:>9.2f}{ratio:>8.2f}x\n"
              f"          planner: {summarize(chosen)}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure the profile, then both tables; write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="planner.json", help="JSON output (default planner.json)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--new-tokens", type=int, default=12,
                   help="tokens per run (default 12: 11 decode periods, their median per row)")
    p.add_argument("--rematch", type=int, default=3,
                   help="planner vs best manual plan re-measured alternately this many times "
                        "(default 3)")
    p.add_argument("--cap-mib", type=int, default=300, help="device cap, MiB (default 300)")
    p.add_argument("--gbps", type=float, default=2.0, help="link cap, GB/s (default 2)")
    p.add_argument("--quick", action="store_true", help="4 configs, batches 1 and 8")
    p.add_argument("--picture", type=Path, default=None, help="write timelines into this dir")
    p.add_argument("--skip-quality", action="store_true", help="only the error table")
    p.add_argument("--skip-errors", action="store_true", help="only the plan-quality table")
    p.add_argument("--one-probe", action="store_true",
                   help="one profile for every configuration (default: a fresh one before each)")
    args = p.parse_args(argv)
    import torch

    from pipo.bench.report import environment, write_json
    from pipo.planner.probe import probe

    torch.set_num_threads(args.threads)
    profile = probe("cpu", "float32")
    doc = {"meta": environment("cpu"), "profile": profile.to_json(), "errors": [], "quality": []}
    sources: dict = {}
    if not args.skip_errors:
        print(f"{'config':<38}{'meas ms':>10}{'pred ms':>11}{'error':>9}  bottleneck")
        doc["errors"] = error_table(profile, args.quick, args.new_tokens, sources, args.picture,
                                    reprobe=not args.one_probe)
        errors = [r["error"] for r in doc["errors"]]
        print(f"median error {100 * statistics.median(errors):.1f} %, "
              f"max {100 * max(errors):.1f} %")
        write_json(doc, args.out)
    if not args.skip_quality:
        print(f"\n{'workload':<10}{'planner':>10}{'predicted':>11}  {'best manual':<22}"
              f"{'tok/s':>9}{'ratio':>9}")
        doc["quality"] = quality_table(profile, args.quick, args.new_tokens, sources,
                                       args.cap_mib * MIB, args.gbps, args.rematch)
        write_json(doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
