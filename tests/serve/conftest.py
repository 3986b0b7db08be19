"""Servers for the serve tests: ``pipo serve``'s own pieces on 127.0.0.1 (a free port), run by
uvicorn in a thread of the test process, so that tests can look at (and break) the scheduler."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import pytest

from tests.cli.tiny_text_model import build_text_model

# A plain chat template for the tiny model (its tokens are characters)
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")
TINY_ID = "tiny"


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory):
    """The CLI tests' tiny character-level llama, with a chat template."""
    path = build_text_model(tmp_path_factory.mktemp("serve-tiny"))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return path


@dataclass
class Running:
    """A server running in a thread: its URL, service (scheduler inside) and uvicorn server."""

    url: str
    service: object
    server: object
    thread: threading.Thread

    def client(self, **kw):
        """An official OpenAI client pointed at this server (no retries)."""
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"),
                      max_retries=0, timeout=120, **kw)

    def wait_idle(self, seconds: float = 60.0) -> None:
        """Wait until no row runs and nothing waits (fails after ``seconds``)."""
        deadline = time.monotonic() + seconds
        while self.service.scheduler.load() != {"running": 0, "queued": 0}:
            assert time.monotonic() < deadline, self.service.scheduler.load()
            time.sleep(0.02)

    def stop(self) -> None:
        """Shut the server down as SIGTERM would, and join its thread."""
        self.server.should_exit = True
        self.thread.join(60)


def start_server(engine, model_id: str, **limits) -> Running:
    """``pipo serve``'s service and app for ``engine`` on a free port of 127.0.0.1."""
    from pipo.serve.app import build_app
    from pipo.serve.server import Limits, bind, build_service, make_server

    service = build_service(engine, model_id, Limits(**limits))
    sock = bind("127.0.0.1", 0)
    server = make_server(build_app(service), shutdown_timeout=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return Running(f"http://127.0.0.1:{sock.getsockname()[1]}", service, server, thread)


@pytest.fixture(scope="module")
def tiny_engine(tiny_text_model):
    """An engine on the tiny model for the server (its scheduler thread owns it)."""
    from pipo.cli_options import open_engine_with
    from pipo.engine import EngineOptions

    with open_engine_with(str(tiny_text_model), EngineOptions()) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference_engine(tiny_text_model):
    """A second engine on the tiny model: each prompt generated alone, for comparison."""
    from pipo.cli_options import open_engine_with
    from pipo.engine import EngineOptions

    with open_engine_with(str(tiny_text_model), EngineOptions()) as engine:
        yield engine


@pytest.fixture(scope="module")
def tiny_server(tiny_engine):
    """The tiny model served with 4 row slots, 4 queue places, 8-token prompt chunks."""
    running = start_server(tiny_engine, TINY_ID, max_batch=4, max_queue=4, prefill_chunk=8,
                           max_len=256)
    yield running
    running.stop()


@dataclass
class Reply:
    """An HTTP reply: status, headers (lower-case names), body."""

    status_code: int
    headers: dict
    content: bytes

    def json(self):
        return json.loads(self.content)


def http(method: str, url: str, *, content: bytes | None = None, json_body=None,
         headers: dict | None = None) -> Reply:
    """One plain HTTP request with the standard library (no client-side checks)."""
    import urllib.error
    import urllib.request

    if json_body is not None:
        content = json.dumps(json_body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=content, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()},
                         response.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def open_stream(url: str, body: dict):
    """A streamed POST left open: (connection, response) to read lines from and close."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", parts.path, body=json.dumps(body),
                       headers={"Content-Type": "application/json"})
    return connection, connection.getresponse()
