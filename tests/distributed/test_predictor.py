"""PipoPredictor, the map_batches callable, called directly (no Ray needed): columns kept,
completions equal to the engine's, token counts, invalid rows marked instead of failing."""

from __future__ import annotations

import numpy as np
import pytest

from pipo.distributed import GenerationConfig, PipoPredictor
from pipo.engine import Engine, EngineOptions
from pipo.io.source import open_model
from tests.distributed.conftest import CONTEXT

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def predictor(tiny_model):
    p = PipoPredictor(GenerationConfig(model=str(tiny_model), max_new_tokens=NEW_TOKENS))
    yield p
    p.close()


def expected(model, prompts):
    with Engine(open_model(model), EngineOptions()) as engine:
        return engine.generate(prompts, NEW_TOKENS)


def test_a_batch_keeps_its_columns_and_gains_completions_and_token_counts(predictor, tiny_model):
    prompts = ["Hello", "a much longer prompt", "xyz"]
    out = predictor({"prompt": np.array(prompts), "id": np.array([7, 8, 9])})
    assert list(out["id"]) == [7, 8, 9] and list(out["prompt"]) == prompts
    assert list(out["completion"]) == expected(tiny_model, prompts)
    assert list(out["prompt_tokens"]) == [len(p) for p in prompts]  # one token per character
    assert all(0 < n <= NEW_TOKENS for n in out["completion_tokens"])
    assert list(out["error"]) == ["", "", ""]


def test_an_invalid_row_gets_an_error_and_the_others_are_generated_as_without_it(predictor,
                                                                               tiny_model):
    prompts = ["Hello", "", "x" * CONTEXT, None, "xyz"]
    out = predictor({"prompt": np.array(prompts, dtype=object)})
    errors = list(out["error"])
    assert errors[0] == errors[4] == ""
    assert errors[1] == "the prompt is empty"
    assert errors[2].startswith(f"the prompt is {CONTEXT} tokens; with -n {NEW_TOKENS} new tokens")
    assert errors[3] == "a prompt must be text, got NoneType"
    assert [out["completion"][i] for i in (1, 2, 3)] == ["", "", ""]
    assert [out["prompt_tokens"][i] for i in (1, 2, 3)] == [0, 0, 0]
    assert [out["completion"][i] for i in (0, 4)] == expected(tiny_model, ["Hello", "xyz"])


def test_close_releases_the_engine_and_may_be_called_twice(tiny_model):
    p = PipoPredictor(GenerationConfig(model=str(tiny_model), max_new_tokens=1))
    engine = p.engine
    p({"prompt": np.array(["a"])})
    p.close()
    p.close()
    assert p.engine is None and engine._weights is None and engine._kv is None
