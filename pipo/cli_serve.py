"""``pipo serve``: an OpenAI-compatible HTTP server with continuous batching (see docs/serve.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipo.cli_options import (add_engine_options, add_model_option, add_threads_option, check,
                              open_engine, positive_int, set_threads)
from pipo.errors import PipoError

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


def add_serve(sub) -> None:
    """Register the ``serve`` subcommand."""
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve /v1/chat/completions, /v1/completions, /v1/models and "
                                   "/health; concurrent requests share each step's weight pass.")
    add_model_option(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    g.add_argument("--port", type=int, default=8000,
                   help="TCP port; 0 picks a free one, printed at start (default: %(default)s)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: none, no key needed)")
    g.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's name in the API (default: the model file or directory "
                        f"name; {DEFAULT_MODEL_ID} for the default model)")
    g.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                   help="requests generated together, one row slot each (default: %(default)s)")
    g.add_argument("--max-queue", type=positive_int, default=64, metavar="N",
                   help="requests waiting for a row slot; more are answered 429 "
                        "(default: %(default)s)")
    g.add_argument("--prefill-chunk", type=positive_int, default=256, metavar="N",
                   help="prompt tokens a row reads per step, beside the other rows' decode "
                        "tokens (default: %(default)s)")
    g.add_argument("--max-len", type=positive_int, default=None, metavar="N",
                   help="tokens per row (prompt + completion); sizes the KV cache "
                        "(default: the model's context, at most 2048)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="seconds in-flight requests get to finish after SIGTERM before they are "
                        "cancelled (default: %(default)s)")
    add_threads_option(p)
    add_engine_options(p)
    p.set_defaults(run=run)


def model_id(model: str | None) -> str:
    """The model's name in the API: its file name without .gguf, or its directory's name."""
    if model is None or model == "default":
        return DEFAULT_MODEL_ID
    path = Path(model)
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def run(args: argparse.Namespace) -> int:
    """Run ``pipo serve`` until SIGTERM or Ctrl+C."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PipoError("pipo serve needs the serve extra: pip install 'pipo[serve]' "
                        "(Starlette and uvicorn)") from None
    from pipo.serve.server import Limits, bind, build_service, serve

    check(0 <= args.port <= 65535, f"--port must be in 0..65535, got {args.port}")
    check(args.shutdown_timeout >= 0, "--shutdown-timeout must be >= 0")
    check(args.api_key is None or args.api_key.strip() != "", "--api-key must not be empty")
    set_threads(args.threads)
    limits = Limits(args.max_batch, args.max_queue, args.prefill_chunk, args.max_len)
    sock = bind(args.host, args.port)  # a taken port fails before the model loads
    try:
        with open_engine(args) as engine:
            service = build_service(engine, args.model_name or model_id(args.model), limits,
                                    args.api_key)
            return serve(service, sock, args.shutdown_timeout)
    finally:
        sock.close()
