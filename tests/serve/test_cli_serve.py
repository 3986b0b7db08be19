"""``pipo serve`` as a process: it prints where it listens, SIGTERM finishes the in-flight request
and exits 0; bad options and a taken port exit 2 with one line."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from pipo.cli import main
from tests.serve.conftest import TINY_ID

pytest.importorskip("openai")
pytest.importorskip("uvicorn")


def start(model, *extra):
    process = subprocess.Popen(
        [sys.executable, "-m", "pipo", "serve", "--model", str(model), "--port", "0",
         "--model-name", TINY_ID, *extra], stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if match := re.search(r"http://127\.0\.0\.1:(\d+)/v1", line):
            return process, f"http://127.0.0.1:{match.group(1)}/v1"
    raise AssertionError(f"pipo serve exited with {process.wait()} before listening")


def refuses_connections(port: int, seconds: float = 30.0) -> bool:
    """True once 127.0.0.1:``port`` refuses a connection (False after ``seconds``)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.02)
    return False


def test_sigterm_finishes_the_in_flight_request_and_exits_0(tiny_text_model):
    from openai import OpenAI

    process, url = start(tiny_text_model)
    try:
        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        stream = client.completions.create(model=TINY_ID, prompt="long", max_tokens=220,
                                           temperature=0, stream=True)
        chunks = iter(stream)
        first = [next(chunks), next(chunks)]
        process.send_signal(signal.SIGTERM)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert refuses_connections(port)  # no new connections while the stream goes on
        rest = list(chunks)
        assert [c.choices[0].finish_reason for c in first + rest][-1] == "length"
        assert process.wait(60) == 0
    finally:
        process.kill()
        process.wait()


def test_sigterm_on_an_idle_server_exits_0(tiny_text_model):
    process, _ = start(tiny_text_model)
    threading.Timer(0.2, process.send_signal, (signal.SIGTERM,)).start()
    assert process.wait(60) == 0


def test_a_taken_port_and_a_bad_port_exit_2(tiny_text_model, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_text_model), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_text_model), "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err
    assert main(["serve", "--model", "/no/such/model", "--port", "0"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_sigterm_with_no_shutdown_time_cancels_the_in_flight_request_and_exits_0(
        tiny_text_model):
    import http.client
    import json

    process, url = start(tiny_text_model, "--shutdown-timeout", "0")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/completions", body=json.dumps(
            {"model": TINY_ID, "prompt": "long", "max_tokens": 240, "temperature": 0,
             "stream": True}), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.readline().startswith(b"data: ")
        process.send_signal(signal.SIGTERM)
        try:
            rest = response.read()
        except http.client.IncompleteRead as cut:  # the server closed the stream mid-way
            rest = cut.partial
        assert b"[DONE]" not in rest and b'"finish_reason": "length"' not in rest
        assert process.wait(60) == 0
    finally:
        process.kill()
        process.wait()


def test_without_the_serve_extra_it_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert main(["serve", "--port", "0"]) == 2
    assert "pip install 'pipo[serve]'" in capsys.readouterr().err
