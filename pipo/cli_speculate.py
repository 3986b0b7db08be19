"""``pipo generate --speculate``: the draft options and the speculating wrapper of an engine."""

from __future__ import annotations

import argparse

from pipo.cli_options import positive_int


def add_speculate_options(parser: argparse.ArgumentParser) -> None:
    """``--speculate``, ``--draft-tokens``, ``--draft-budget`` and ``--draft-group-size``."""
    g = parser.add_argument_group("speculative decoding (see docs/speculate.md)")
    g.add_argument("--speculate", default="off", metavar="int4|MODEL|ngram|off",
                   help="draft tokens and verify them in one pass of the target: int4 (the "
                        "model's own weights re-quantized to int4, resident), MODEL (a path to a "
                        "small model with the same tokenizer), ngram (prompt lookup, no model), "
                        "off; output is identical to plain generation when greedy, and has the "
                        "target's distribution when sampling (default: %(default)s)")
    g.add_argument("--draft-tokens", type=positive_int, default=4, metavar="K",
                   help="draft tokens per round to start with; adapts to the running acceptance "
                        "rate within 1..2K (default: %(default)s)")
    g.add_argument("--draft-budget", type=positive_int, default=None, metavar="N",
                   help="draft a token tree of up to N tokens per round (depth adapted within "
                        "1..2K; SpecExec-style for int4 / MODEL, several prompt matches for "
                        "ngram) and verify it in one pass; exact for greedy and sampling alike "
                        "(default: a chain)")
    g.add_argument("--draft-group-size", type=int, default=128, metavar="N",
                   help="int4 group size of the int4 draft: 32, 64 or 128 (default: %(default)s)")


def speculative(engine, args: argparse.Namespace, max_len: int):
    """``engine`` itself without ``--speculate``, else a Speculator over it with the draft."""
    if args.speculate == "off":
        return engine
    from pipo.engine.drafts import make_draft
    from pipo.engine.speculate import Speculator

    draft = make_draft(args.speculate, engine, max_len, group_size=args.draft_group_size)
    return Speculator(engine, draft, k=args.draft_tokens, k_max=2 * args.draft_tokens,
                      budget=args.draft_budget)
