"""``pipo generate --speculate``: the draft options and the speculating wrapper of an engine."""

from __future__ import annotations

import argparse

from pipo.cli_options import positive_int


def add_speculate_options(parser: argparse.ArgumentParser) -> None:
    """``--speculate``, ``--draft-tokens``, ``--draft-budget`` and ``--draft-group-size``."""
    g = parser.add_argument_group("speculative decoding (see docs/speculate.md)")
    g.add_argument("--speculate", default="auto", metavar="auto|int4|MODEL|ngram|off",
                   help="draft tokens and verify them in one pass of the target: int4 (the "
                        "model's own weights re-quantized to int4, resident), MODEL (a path to a "
                        "small model with the same tokenizer), ngram (prompt lookup, no model), "
                        "off; auto lets the planner decide: int4 at batch 1 when the decode step "
                        "is link-bound (weights streamed from host RAM or disk) and the draft "
                        "fits the memory caps, else off (pipo plan shows why); output is "
                        "identical to plain generation when greedy, and has the target's "
                        "distribution when sampling (default: %(default)s)")
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


def speculative(engine, args: argparse.Namespace, max_len: int, batch: int = 1):
    """``engine`` itself when not speculating, else a Speculator over it with the draft;
    ``--speculate auto``: as the planner decides for ``batch`` rows
    (:mod:`pipo.planner.speculation`)."""
    from pipo.engine.speculating import planned_kind, speculator

    kind = args.speculate
    if kind == "auto":
        kind = planned_kind(engine, max_len, batch, args.max_new_tokens, args.draft_group_size)
    if kind == "off":
        return engine
    return speculator(engine, kind, max_len, draft_tokens=args.draft_tokens,
                      draft_budget=args.draft_budget, draft_group_size=args.draft_group_size)
