"""The ``pipo`` command: ``generate``, ``serve``, ``perplexity``, ``info``, ``graph``, ``convert``,
``verify``, ``probe``, ``plan``, ``bench``.

Every user error (a :class:`~pipo.errors.PipoError`) prints one line ``pipo: error: ...`` and exits
with status 2; no traceback. Subcommands live in small modules, each with ``add_parser`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import sys

from pipo.errors import EXIT_USER_ERROR, PipoError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from pipo import __version__
    from pipo.cli_generate import add_generate
    from pipo.cli_perplexity import add_perplexity
    from pipo.cli_plan import add_plan, add_probe
    from pipo.cli_serve import add_serve
    from pipo.cli_tools import add_convert, add_graph, add_info, add_verify

    parser = argparse.ArgumentParser(
        prog="pipo", description="Pipelined offloading inference for LLMs on small GPUs and CPUs.")
    parser.add_argument("--version", action="version", version=f"pipo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate(sub)
    add_serve(sub)
    add_perplexity(sub)
    add_info(sub)
    add_graph(sub)
    add_convert(sub)
    add_verify(sub)
    add_probe(sub)
    add_plan(sub)
    _add_bench(sub)
    return parser


def _add_bench(sub) -> None:
    try:
        from pipo.bench.cli import add_parser
    except ImportError:  # the bench package is optional in stripped installs
        return
    add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pipo`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except PipoError as exc:
        print(f"pipo: error: {exc.for_cli()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        # notes say what an interrupted command kept (e.g. the finished part of a JSONL batch)
        kept = "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
        print(f"pipo: interrupted{kept}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
