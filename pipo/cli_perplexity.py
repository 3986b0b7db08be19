"""``pipo perplexity FILE``: the perplexity of a text file under a model (sliding windows)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipo.cli_options import (
    add_engine_options,
    add_model_option,
    add_threads_option,
    check,
    open_engine,
    positive_int,
    set_threads,
)
from pipo.engine.perplexity import DEFAULT_STRIDE, DEFAULT_WINDOW, perplexity


def add_perplexity(sub) -> None:
    """Register the ``perplexity`` subcommand."""
    p = sub.add_parser("perplexity", help="perplexity of a text file (quality check)",
                       description="Perplexity of a UTF-8 text file: logits at every position over "
                                   "sliding windows; each token is scored once, token 0 never.")
    p.add_argument("file", type=Path, help="UTF-8 text file")
    add_model_option(p)
    p.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW, metavar="N",
                   help="tokens per window (default: %(default)s)")
    p.add_argument("--stride", type=positive_int, default=DEFAULT_STRIDE, metavar="N",
                   help="tokens between window starts; a token is scored with at least "
                        "window - stride tokens before it (default: %(default)s)")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                   help="score only the first N tokens of the text (default: all)")
    add_threads_option(p)
    add_engine_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``pipo perplexity``."""
    check(args.file.is_file(), f"{args.file}: no such file")
    try:
        text = args.file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        check(False, f"{args.file} is not UTF-8 text")
    check(args.stride <= args.window, f"--stride ({args.stride}) must not exceed --window ({args.window})")
    set_threads(args.threads)
    with open_engine(args) as engine:
        check(engine.tokenizer is not None, "this model has no tokenizer; perplexity needs one")
        ids = engine.tokenizer.encode(text)[:args.max_tokens]
        check(len(ids) >= 2, f"{args.file}: fewer than 2 tokens")
        result = perplexity(engine, ids, window=args.window, stride=args.stride)
        path = f"weights {engine.options.weights}, {str(engine.dtype).removeprefix('torch.')}"
    print(f"perplexity {result.perplexity:.3f} over {result.n_tokens} tokens ({result.n_scored} "
          f"scored; window {result.window}, stride {result.stride}; {path})")
    return 0
