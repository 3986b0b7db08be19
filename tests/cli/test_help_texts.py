"""Every option of every subcommand explains itself: a help text that states its default (or it is
a flag), and ``bench --help`` points to a file inside the repository."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from pipo.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


def test_every_subcommand_is_walked():
    assert set(subcommands()) == {"generate", "serve", "perplexity", "info", "graph", "convert",
                                  "verify", "probe", "plan", "bench"}


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_a_help_that_states_its_default_or_is_a_flag(name):
    parser = subcommands()[name]
    parser.format_help()  # every %(default)s expands
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        label = "/".join(action.option_strings) or action.dest
        text = expanded_help(parser, action)
        is_flag = action.nargs == 0
        needs_default = not is_flag and (action.option_strings or action.nargs == "?")
        if not text.strip():
            problems.append(f"{label}: no help")
        elif needs_default and not re.search(r"\(default: [^)]+\)", text):
            problems.append(f"{label}: help does not state the default: {text!r}")
        elif "None" in text:
            problems.append(f"{label}: help shows a raw None: {text!r}")
    assert not problems, f"pipo {name}:\n" + "\n".join(problems)


def test_generate_has_threads():
    action = next(a for a in subcommands()["generate"]._actions if "--threads" in a.option_strings)
    assert action.type("3") == 3


def test_bench_help_points_to_a_file_in_the_repository():
    text = subcommands()["bench"].format_help()
    docs = re.findall(r"\b(docs/[\w.-]+\.md|benchmarks/[\w.-]+\.md)\b", text)
    assert docs and all((ROOT / d).is_file() for d in docs), text
    assert "shared" not in text and "BENCH.md" not in text
    assert "pip install -e .[bench]" in text
