"""``pipo serve`` through the official openai client: chat and completions, streamed and not,
concurrent requests joining mid-run (each equal to its prompt generated alone), a disconnect
mid-stream, every error case, the API key, a full queue and a failing step."""

from __future__ import annotations

import threading

import pytest

from tests.serve.conftest import TINY_ID, http, open_stream

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

GREEDY = {"temperature": 0}


def alone(engine, ids, n):
    """(text, tokens) of the prompt ``ids`` generated alone with ``pipo``'s engine, greedy."""
    tokens = engine.generate_ids([ids], n).tokens[0]
    return engine.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def chat_ids(engine, content):
    messages = [{"role": "user", "content": content}]
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages), add_bos=False)


def test_completion_equals_the_prompt_generated_alone(tiny_server, reference_engine):
    out = tiny_server.client().completions.create(model=TINY_ID, prompt="The cat sat",
                                                  max_tokens=12, **GREEDY)
    text, n = alone(reference_engine, reference_engine.tokenizer.encode("The cat sat"), 12)
    assert out.object == "text_completion" and out.model == TINY_ID
    assert out.choices[0].text == text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (11, n)
    assert out.usage.total_tokens == 11 + n


def test_streamed_completion_is_the_same_text_with_usage_last(tiny_server):
    client = tiny_server.client()
    whole = client.completions.create(model=TINY_ID, prompt="abc", max_tokens=10, **GREEDY)
    chunks = list(client.completions.create(model=TINY_ID, prompt="abc", max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_streamed_and_not(tiny_server, reference_engine):
    client = tiny_server.client()
    messages = [{"role": "user", "content": "Hi there"}]
    whole = client.chat.completions.create(model=TINY_ID, messages=messages, max_tokens=9, **GREEDY)
    text, _ = alone(reference_engine, chat_ids(reference_engine, "Hi there"), 9)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == text
    assert whole.usage.prompt_tokens == len(chat_ids(reference_engine, "Hi there"))
    chunks = list(client.chat.completions.create(model=TINY_ID, messages=messages, max_tokens=9,
                                                 stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_concurrent_requests_joining_mid_run_equal_each_prompt_alone(tiny_server,
                                                                     reference_engine):
    prompts = ["a", "Bb" * 9, "The quick brown fox jumps over", "x" * 45, "hello world!",
               "z" * 3, "0123456789" * 3]
    outs: dict[int, tuple[str, int]] = {}
    started = [threading.Event() for _ in prompts]

    def ask(i):
        stream = tiny_server.client().completions.create(
            model=TINY_ID, prompt=prompts[i], max_tokens=60 + i, stream=True, **GREEDY)
        pieces = []
        for chunk in stream:
            started[i].set()
            pieces.append(chunk.choices[0].text)
        outs[i] = "".join(pieces)

    threads = []
    for i in range(len(prompts)):  # each joins once the one before it streams
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        started[i].wait(60)
    for t in threads:
        t.join(120)
    for i, prompt in enumerate(prompts):
        assert outs[i] == alone(reference_engine, reference_engine.tokenizer.encode(prompt),
                                60 + i)[0], prompt
    # the batch was full: requests waited for slots and joined mid-run
    assert tiny_server.service.scheduler.stats.peak_rows == 4


def test_a_client_disconnecting_mid_stream_frees_its_row(tiny_server):
    stats = tiny_server.service.scheduler.stats
    cancelled = stats.cancelled
    connection, response = open_stream(f"{tiny_server.url}/v1/completions",
                                       {"model": TINY_ID, "prompt": "q", "max_tokens": 250,
                                        "stream": True, **GREEDY})
    got = [response.readline() for _ in range(6)]
    connection.close()  # the client goes away mid-stream
    assert response.status == 200 and all(line.startswith(b"data: ") or line == b"\n"
                                           for line in got)
    tiny_server.wait_idle()
    assert stats.cancelled == cancelled + 1  # cancelled, not finished after 250 tokens


@pytest.mark.parametrize("body, param", [
    ({"temperature": 2.5}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"seed": -1}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": ""}, "prompt"), ({"prompt": [1, 2, 3, 9999]}, "prompt"),
])
def test_bad_sampling_and_request_values_answer_400_naming_the_field(tiny_server, body, param):
    request = {"model": TINY_ID, "prompt": "hi", "max_tokens": 3, **body}
    with pytest.raises(openai.BadRequestError) as err:
        tiny_server.client().completions.create(**request)
    assert err.value.status_code == 400 and err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["message"]


def test_an_over_long_prompt_answers_400_context_length_exceeded(tiny_server):
    with pytest.raises(openai.BadRequestError) as err:
        tiny_server.client().completions.create(model=TINY_ID, prompt="w" * 250, max_tokens=10)
    assert err.value.code == "context_length_exceeded" and "256" in err.value.body["message"]


def test_an_unknown_model_answers_404(tiny_server):
    with pytest.raises(openai.NotFoundError) as err:
        tiny_server.client().chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and "tiny" in err.value.body["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"model": "tiny"}',
                                     b'{"model": "tiny", "messages": [{"role": "cat"}]}',
                                     (b'{"model": "tiny", "messages": [{"role": "user", '
                                      b'"content": "x"}], "logprobs": true}')])
def test_a_bad_body_answers_400_in_openais_shape(tiny_server, content):
    response = http("POST", f"{tiny_server.url}/v1/chat/completions", content=content)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_models_and_health(tiny_server):
    models = tiny_server.client().models.list()
    assert [m.id for m in models.data] == [TINY_ID]
    assert tiny_server.client().models.retrieve(TINY_ID).id == TINY_ID
    assert http("GET", f"{tiny_server.url}/health").json()["status"] == "ok"


def test_stop_strings_cut_the_text_and_free_the_row(tiny_server):
    client = tiny_server.client()
    full = client.completions.create(model=TINY_ID, prompt="stop", max_tokens=30, **GREEDY)
    text = full.choices[0].text
    stop = text[5:7]
    cut = client.completions.create(model=TINY_ID, prompt="stop", max_tokens=30, stop=[stop],
                                    **GREEDY)
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=TINY_ID, prompt="stop", max_tokens=30, stop=stop,
                                         stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    tiny_server.wait_idle()


def test_the_api_key_guards_every_route_but_health(tiny_server):
    tiny_server.service.config.api_key = "sekret"
    try:
        with pytest.raises(openai.AuthenticationError):
            tiny_server.client(api_key="wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            tiny_server.client(api_key="wrong").completions.create(model=TINY_ID, prompt="a",
                                                                   max_tokens=2)
        empty = http("POST", f"{tiny_server.url}/v1/chat/completions", json_body={})
        assert empty.status_code == 401
        for header in ("sekret", "Basic sekret", "Bearer sekret2"):
            assert http("GET", f"{tiny_server.url}/v1/models",
                        headers={"Authorization": header}).status_code == 401
        assert http("GET", f"{tiny_server.url}/v1/models",
                    headers={"Authorization": "bearer sekret"}).status_code == 200
        out = tiny_server.client(api_key="sekret").completions.create(model=TINY_ID, prompt="a",
                                                                      max_tokens=2)
        assert out.usage.completion_tokens == 2
        assert http("GET", f"{tiny_server.url}/health").status_code == 200
    finally:
        tiny_server.service.config.api_key = None


def patch_pass(monkeypatch, scheduler, wrap):
    """Replace the batch call that runs the scheduler's weight passes (submit, else step) with
    ``wrap(original)``."""
    name = "submit" if hasattr(scheduler.batch, "submit") else "step"
    monkeypatch.setattr(scheduler.batch, name, wrap(getattr(scheduler.batch, name)))


def gate_steps(monkeypatch, scheduler):
    """Make the scheduler's steps wait for the returned event; returns it."""
    gate = threading.Event()

    def wrap(original):
        def gated(*args, **kw):
            gate.wait(60)
            return original(*args, **kw)
        return gated

    patch_pass(monkeypatch, scheduler, wrap)
    return gate


def test_a_full_queue_answers_429_with_retry_after(tiny_server, monkeypatch):
    scheduler = tiny_server.service.scheduler
    gate = gate_steps(monkeypatch, scheduler)
    body = {"model": TINY_ID, "prompt": "go", "max_tokens": 2}
    results, threads = [], []

    def post():
        reply = http("POST", f"{tiny_server.url}/v1/completions", json_body=body)
        results.append(reply.status_code)

    try:  # requests until 4 wait: the steps hold, so the first ones keep their slots
        while scheduler.load()["queued"] < 4:
            threads.append(threading.Thread(target=post))
            threads[-1].start()
            tiny_server_wait(lambda: sum(scheduler.load().values()) == len(threads))
        refused = http("POST", f"{tiny_server.url}/v1/completions", json_body=body)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        gate.set()
        for t in threads:
            t.join(60)
    assert results == [200] * len(threads)


def tiny_server_wait(condition, seconds=60.0):
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_an_exception_in_a_step_fails_its_rows_with_500_and_serving_goes_on(tiny_server,
                                                                             monkeypatch):
    calls = []

    def wrap(original):
        def broken_once(*args, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("the device fell over")
            return original(*args, **kw)
        return broken_once

    patch_pass(monkeypatch, tiny_server.service.scheduler, wrap)
    client = tiny_server.client()
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=TINY_ID, prompt="boom", max_tokens=3)
    assert "the device fell over" in err.value.body["message"]
    out = client.completions.create(model=TINY_ID, prompt="boom", max_tokens=3)
    assert out.usage.completion_tokens == 3


def test_each_request_samples_with_its_own_seed_whatever_shares_its_steps(tiny_server):
    client = tiny_server.client()

    def sampled(seed):
        return client.completions.create(model=TINY_ID, prompt="Roll", max_tokens=24,
                                         temperature=1.5, top_p=0.95, seed=seed).choices[0].text

    alone_7, alone_8 = sampled(7), sampled(8)
    outs = {}
    threads = [threading.Thread(target=lambda s=s: outs.__setitem__(s, sampled(s)))
               for s in (7, 8)]
    threads.append(threading.Thread(target=lambda: client.completions.create(
        model=TINY_ID, prompt="greedy neighbour", max_tokens=30, **GREEDY)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outs == {7: alone_7, 8: alone_8}
    assert alone_7 != alone_8


def test_a_client_giving_up_on_a_whole_response_frees_its_row(tiny_server, monkeypatch):
    import time
    import urllib.request

    def wrap(original):  # 250 steps of >= 20 ms each: the answer cannot beat the client's timeout
        def slowed(*args, **kw):
            time.sleep(0.02)
            return original(*args, **kw)
        return slowed

    patch_pass(monkeypatch, tiny_server.service.scheduler, wrap)
    stats = tiny_server.service.scheduler.stats
    cancelled = stats.cancelled
    request = urllib.request.Request(
        f"{tiny_server.url}/v1/completions", method="POST",
        data=b'{"model": "tiny", "prompt": "w", "max_tokens": 250, "temperature": 0}',
        headers={"Content-Type": "application/json"})
    with pytest.raises(OSError):  # a timeout: the client hangs up before the answer
        urllib.request.urlopen(request, timeout=0.3)
    tiny_server.wait_idle()
    assert stats.cancelled == cancelled + 1


def test_streamed_weights_and_offloaded_kv_serve_the_same_tokens(tiny_text_model, reference_engine):
    """The overlap path (next step's loads started while sampling) with weights and KV streamed."""
    from pipo.cli_options import open_engine_with
    from pipo.engine import EngineOptions
    from tests.serve.conftest import start_server

    prompts = ["short", "a somewhat longer prompt here", "mid length"]
    with open_engine_with(str(tiny_text_model),
                          EngineOptions(placement="host", kv_offload=True)) as engine:
        running = start_server(engine, TINY_ID, max_batch=2, max_queue=4, prefill_chunk=4,
                               max_len=128)
        try:
            outs = {}

            def ask(i):
                out = running.client().completions.create(model=TINY_ID, prompt=prompts[i],
                                                          max_tokens=16 + 3 * i, **GREEDY)
                outs[i] = out.choices[0].text

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        finally:
            running.stop()
    for i, prompt in enumerate(prompts):
        ids = reference_engine.tokenizer.encode(prompt)
        assert outs[i] == alone(reference_engine, ids, 16 + 3 * i)[0], prompt
