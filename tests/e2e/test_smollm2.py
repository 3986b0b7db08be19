"""The default model: pipo's greedy text equals transformers' on the same GGUF weights."""

from __future__ import annotations

import pytest
import torch

import pipo
from pipo.io.default_model import default_model_path

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def hf_texts():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    texts = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


@pytest.mark.slow
def test_greedy_text_equals_transformers(hf_texts):
    with pipo.load() as engine:
        texts = engine.generate(PROMPTS, NEW_TOKENS)
    assert texts == hf_texts
    assert "Paris" in texts[0]


@pytest.mark.slow
def test_streamed_from_host_with_offloaded_kv(hf_texts):
    with pipo.load(placement="host", kv_offload=True, micro_batch=2) as engine:
        texts = engine.generate(PROMPTS, NEW_TOKENS)
    assert texts == hf_texts
