"""``pipo info``, ``pipo graph``, ``pipo convert`` and ``pipo verify``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipo.cli_options import (add_engine_options, add_model_option, open_engine,
                              parse_size, positive_int)
from pipo.cli_paths import check_output_file
from pipo.errors import PipoError


def add_info(sub) -> None:
    """Register ``pipo info``."""
    p = sub.add_parser("info", help="architecture, sizes per block and the plan for a budget")
    add_model_option(p, positional=True)
    _add_plan_options(p)
    add_engine_options(p)
    p.set_defaults(run=run_info)


def add_graph(sub) -> None:
    """Register ``pipo graph``."""
    p = sub.add_parser("graph", help="the step DAG as DOT, PNG, SVG or JSON")
    add_model_option(p, positional=True)
    p.add_argument("--phase", choices=["decode", "prefill"], default="decode",
                   help="the step to draw: prefill (the prompt) or decode (one new token) "
                        "(default: %(default)s)")
    p.add_argument("--output", "-o", type=Path, default=None, metavar="FILE",
                   help="file to write, by suffix: .png or .svg (a picture), .dot (Graphviz), "
                        ".json (the graph as data) (default: DOT text to stdout)")
    p.add_argument("--layers", type=_layer_list, default=None, metavar="LIST",
                   help="model layers a picture shows, e.g. 0-2,29; the others are elided "
                        "(default: all of up to 4 layers, else the first two and the last; .dot "
                        "and .json always hold every layer)")
    _add_plan_options(p)
    add_engine_options(p)
    p.set_defaults(run=run_graph)


def add_convert(sub) -> None:
    """Register ``pipo convert``."""
    p = sub.add_parser("convert", help="write an offload store (one aligned blob per block)")
    p.add_argument("model", help="GGUF file or Hugging Face safetensors directory")
    p.add_argument("out", type=Path, help="store directory to create")
    p.add_argument("--weights", choices=["keep", "fp16", "fp32", "int4"], default="keep",
                   help="keep: tensors as the source stores them (4-bit and 8-bit GGUF blocks bit for "
                        "bit); fp16/fp32: dequantize and cast; int4: keep, and quantize dense linear "
                        "weights to 4 bits (default: keep)")
    p.add_argument("--group-size", type=int, default=64, metavar="N",
                   help="values per scale of weights quantized by --weights int4: 32, 64 or 128 "
                        "(default: 64; already 4-bit GGUF blocks keep their 32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is an existing pipo store (anything else is refused)")
    p.set_defaults(run=run_convert)


def add_verify(sub) -> None:
    """Register ``pipo verify``."""
    p = sub.add_parser("verify", help="check every block checksum of an offload store")
    p.add_argument("store", type=Path, help="offload store directory (made by pipo convert)")
    p.set_defaults(run=run_verify)


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan")
    g.add_argument("--batch", type=positive_int, default=1, metavar="N",
                   help="sequences generated together (default: %(default)s)")
    g.add_argument("--max-len", type=positive_int, default=None, metavar="TOKENS",
                   help="tokens per sequence, prompt + new ones; sizes the KV cache "
                        "(default: the model's context, at most 2048)")


def _layer_list(text: str) -> list[int]:
    from pipo.runtime.picture import parse_layers

    try:
        return parse_layers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _plan(engine, args):
    max_len = args.max_len or min(engine.spec.max_positions, 2048)
    if max_len > engine.spec.max_positions:
        raise PipoError(f"--max-len {max_len} exceeds the model's context of "
                        f"{engine.spec.max_positions} tokens")
    return engine.plan_for(args.batch, max_len)


def run_info(args: argparse.Namespace) -> int:
    """Print the architecture, per-block sizes and the plan."""
    from pipo.info import describe

    with open_engine(args) as engine:
        print(describe(engine, _plan(engine, args)))
    return 0


def run_graph(args: argparse.Namespace) -> int:
    """Build the step graph of the plan and write it."""
    from graphs import build_step
    from pipo.runtime.render import render, to_dot

    if args.output is not None:
        if args.output.suffix.lower() not in (".dot", ".png", ".svg", ".json"):
            raise PipoError(f"unknown graph format {args.output.suffix!r}: "
                            "use .dot, .png, .svg or .json")
        check_output_file(args.output, "--output")
    with open_engine(args) as engine:
        plan = _plan(engine, args)
        graph = build_step(engine.spec, plan, args.phase)
        n_layers = engine.spec.n_layers
    beyond = [layer for layer in args.layers or () if layer >= n_layers]
    if beyond:
        raise PipoError(f"--layers {beyond[0]}: the model has layers 0-{n_layers - 1}")
    if args.output is None:
        sys.stdout.write(to_dot(graph))
        return 0
    title = (f"{args.phase} step, {plan.schedule} schedule: {n_layers} layers, "
             f"{'KV offloaded' if plan.kv_offloaded else 'KV on the device'}")
    render(graph, args.output, title=title, layers=args.layers)
    print(f"wrote {args.output} ({graph.number_of_nodes()} tasks, {graph.number_of_edges()} edges)")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint into an offload store."""
    from pipo.io.source import open_model
    from pipo.io.store import convert

    source = open_model(args.model)
    path = convert(source, args.out, weights=args.weights, group_size=args.group_size,
                   overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Verify every checksum of a store."""
    from pipo.io.store import OffloadStore

    with OffloadStore(args.store) as store:
        store.verify()
    print(f"{args.store}: all block checksums match")
    return 0


__all__ = ["add_convert", "add_graph", "add_info", "add_verify", "parse_size"]
