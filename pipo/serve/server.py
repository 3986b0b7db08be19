"""Putting a server together: engine -> row slots -> scheduler -> service -> app -> uvicorn.

Shutdown (SIGTERM or SIGINT): uvicorn stops accepting connections, gives in-flight responses
``shutdown_timeout`` seconds to finish, then cancels them; the app's shutdown then stops the
scheduler (cancelling what is left) and the process exits 0 (130 after SIGINT).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from dataclasses import dataclass

from pipo.errors import PipoError
from pipo.serve.scheduler import Scheduler
from pipo.serve.service import ServeConfig, Service

DEFAULT_MAX_LEN = 2048


@dataclass
class Limits:
    """The scheduler's limits: rows per step, waiting requests, prompt tokens per row and step."""

    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int = 256
    max_len: int | None = None


def build_service(engine, model_id: str, limits: Limits, api_key: str | None = None) -> Service:
    """A started scheduler over ``engine``'s row slots, behind a :class:`Service`."""
    if engine.tokenizer is None:
        raise PipoError("pipo serve needs a model with a tokenizer (text in, text out)")
    max_len = min(limits.max_len or DEFAULT_MAX_LEN, engine.spec.max_positions)
    batch = engine.open_batch(limits.max_batch, max_len)  # per-row KV: docs/rows.md
    scheduler = Scheduler(batch, max_batch=limits.max_batch, max_queue=limits.max_queue,
                          prefill_chunk=limits.prefill_chunk, eos_ids=tuple(engine.spec.eos_ids))
    scheduler.start()
    return Service(engine.tokenizer, scheduler, ServeConfig(model_id, max_len, api_key))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); PipoError when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PipoError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    return sock


def make_server(app, shutdown_timeout: float = 30.0):
    """A uvicorn server for ``app`` that exits normally on SIGTERM (see the module docstring)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, minus re-raising the signal that stopped it."""

        @contextlib.contextmanager
        def capture_signals(self):
            import threading

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            signals = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout)
    return Server(config)


def serve(service: Service, sock: socket.socket, shutdown_timeout: float = 30.0) -> int:
    """Serve on ``sock`` until SIGTERM or SIGINT; returns the exit status (0, 130 after SIGINT)."""
    from pipo.serve.app import build_app

    try:
        server = make_server(build_app(service), shutdown_timeout)
        host, port = sock.getsockname()[:2]
        print(f"pipo serve: {service.config.model_id} on http://{host}:{port}/v1 "
              f"(OpenAI API; Ctrl+C or SIGTERM stops)", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
        service.scheduler.stop(cancel=True, timeout=60)
    return 130 if signal.SIGINT in server._captured_signals else 0
