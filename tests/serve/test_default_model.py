"""``pipo serve`` on the default model (SmolLM2-135M-Instruct): concurrent chat requests of
different lengths, streamed and not, each equal to its prompt generated alone (greedy).

Dense fp32 (``dtype="float32"``): the CPU default, the 4-bit path in bf16, rounds differently for
different batch shapes, so a shared step may pick another token where two are nearly tied."""

from __future__ import annotations

import threading

import pytest

from tests.serve.conftest import start_server

pytestmark = pytest.mark.slow
pytest.importorskip("openai")
pytest.importorskip("uvicorn")
MODEL_ID = "SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers and explain briefly why each of them is prime."]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def default_engine():
    from pipo.cli_options import open_engine_with
    from pipo.engine import EngineOptions

    with open_engine_with(None, EngineOptions(dtype="float32")) as engine:
        yield engine


def test_concurrent_chats_on_the_default_model_equal_each_alone(default_engine):
    expected = [default_engine.generate(q, NEW_TOKENS, chat=True) for q in QUESTIONS]
    running = start_server(default_engine, MODEL_ID, max_batch=4, max_queue=8, prefill_chunk=16,
                           max_len=512)
    try:
        outs = {}

        def ask(i):
            client = running.client()
            messages = [{"role": "user", "content": QUESTIONS[i]}]
            if i % 2:
                stream = client.chat.completions.create(
                    model=MODEL_ID, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
                    stream=True)
                outs[i] = "".join(c.choices[0].delta.content or "" for c in stream)
            else:
                out = client.chat.completions.create(model=MODEL_ID, messages=messages,
                                                     max_tokens=NEW_TOKENS, temperature=0)
                outs[i] = out.choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert [outs[i] for i in range(len(QUESTIONS))] == expected
        assert running.service.scheduler.stats.peak_rows > 1  # they did share steps
    finally:
        running.stop()
