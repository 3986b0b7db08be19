"""The default model: pipo's greedy text equals transformers' on the same GGUF weights."""

from __future__ import annotations

import pytest

import pipo
from tests.e2e.conftest import SMOL_NEW_TOKENS as NEW_TOKENS
from tests.e2e.conftest import SMOL_PROMPTS as PROMPTS


@pytest.mark.slow
def test_greedy_text_equals_transformers(smollm2_reference):
    with pipo.load(dtype="float32") as engine:  # dense: the default would be the 4-bit path
        texts = engine.generate(PROMPTS, NEW_TOKENS)
    assert texts == smollm2_reference
    assert "Paris" in texts[0]


@pytest.mark.slow
def test_streamed_from_host_with_offloaded_kv(smollm2_reference):
    with pipo.load(placement="host", kv_offload=True, micro_batch=2, dtype="float32") as engine:
        texts = engine.generate(PROMPTS, NEW_TOKENS)
    assert texts == smollm2_reference
