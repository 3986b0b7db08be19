"""``pipo generate``: one prompt streamed to the terminal, or a JSONL batch with a progress bar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipo.cli_batch import read_prompts, run_batch
from pipo.cli_options import (add_engine_options, add_model_option, add_threads_option, check,
                              open_engine, positive_int, set_threads)
from pipo.cli_paths import check_output_file
from pipo.cli_speculate import add_speculate_options, speculative
from pipo.ops.sampling import SamplingParams


def add_generate(sub) -> None:
    """Register the ``generate`` subcommand."""
    p = sub.add_parser("generate", help="generate text from a prompt or a JSONL file of prompts",
                       description="Generate text. Greedy unless --temperature > 0.")
    p.add_argument("prompt", nargs="?",
                   help="the prompt; its completion streams to stdout (default: none, then "
                        "--input FILE is needed)")
    add_model_option(p)
    p.add_argument("--max-new-tokens", "-n", type=positive_int, default=64, metavar="N",
                   help="new tokens per prompt at most; generation also stops at the model's "
                        "end-of-text token (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 picks the most likely token, higher is more "
                        "random (default: %(default)s, greedy)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens only (default: 0, no limit)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample among the most likely tokens whose probabilities add up to P, "
                        "in (0, 1] (default: 1.0, no limit)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for sampling, an integer >= 0, to repeat a run "
                        "(default: a fresh seed each run)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None,
                   help="system message, with --chat (default: none)")
    p.add_argument("--input", type=Path, metavar="FILE",
                   help="JSONL file, one {\"prompt\": ...} object per line; every line is checked "
                        "before generating (default: none, use the prompt argument)")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="JSONL file for --input's records with a \"completion\" field added; "
                        "written as FILE.partial batch by batch and renamed to FILE when all "
                        "are done, so an interrupted run keeps FILE.partial "
                        "(default: none; required with --input)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="prompts generated together, with --input (default: %(default)s)")
    add_threads_option(p)
    add_engine_options(p)
    add_speculate_options(p)
    _add_ray_options(p)
    p.set_defaults(run=run)


def _add_ray_options(parser) -> None:
    g = parser.add_argument_group("ray (with --input; needs the ray extra, see "
                                  "docs/distributed.md)")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the --input job on a Ray cluster, one engine per worker: a new "
                        "local cluster when no ADDRESS, else the cluster at ADDRESS (auto, "
                        "HOST:PORT or ray://HOST:PORT) (default: off, one process)")
    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="Ray workers, each holding one engine, with --ray (default: 1)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs Ray reserves for each worker, with --ray; 0.5 puts two workers "
                        "on a GPU (default: 1 with --device cuda, else 0)")


def run(args: argparse.Namespace) -> int:
    """Run ``pipo generate``."""
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    sampling.validate()
    check((args.prompt is None) != (args.input is None),
          "give either a prompt or --input FILE (not both, not neither)")
    check(args.input is None or args.output is not None, "--input needs --output FILE")
    check(args.output is None or args.input is not None, "--output needs --input FILE")
    if args.output is not None:
        check_output_file(args.output, "--output")
    check(args.ray is not None or (args.workers is None and args.gpus_per_worker is None),
          "--workers and --gpus-per-worker need --ray")
    check(args.ray is None or args.input is not None, "--ray needs --input FILE")
    check(args.ray is None or args.speculate in ("off", "auto"),
          "--speculate does not run with --ray yet")
    prompts = read_prompts(args.input) if args.input else None
    if args.ray is not None:
        from pipo.distributed.job import run_ray_batch

        return run_ray_batch(args, sampling, prompts)
    set_threads(args.threads)
    with open_engine(args) as target:
        batch = 1 if prompts is None else min(args.batch_size, len(prompts))
        engine = speculative(target, args, _max_len(target, args, prompts), batch)
        try:
            if prompts is None:
                return _stream_one(engine, args, sampling)
            return run_batch(engine, args, sampling, prompts)
        finally:
            if engine is not target:
                engine.draft.close()


def _max_len(engine, args, prompts) -> int:
    """Longest sequence a draft may hold: the longest prompt (in tokens, a bound) + new tokens
    + a round's drafts (a chain, or a tree's evaluated nodes)."""
    texts = [args.prompt] if prompts is None else [p.prompt for p in prompts]
    longest = max(len(engine.tokenizer.encode(t)) for t in texts) if engine.tokenizer else 0
    return longest + 64 + args.max_new_tokens + 2 * args.draft_tokens + (args.draft_budget or 0) + 2


def _stream_one(engine, args, sampling: SamplingParams) -> int:
    # The prompt is echoed with the first piece, so an error before generation prints alone.
    pending = [] if args.chat else [args.prompt]

    def show(_row: int, piece: str) -> None:
        sys.stdout.write("".join(pending) + piece)
        pending.clear()
        sys.stdout.flush()

    engine.generate(args.prompt, args.max_new_tokens, sampling, chat=args.chat,
                    system=args.system, on_text=show)
    sys.stdout.write("".join(pending) + "\n")
    return 0
