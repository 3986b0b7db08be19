"""pipo.ops.sampling: greedy, top-k, top-p, seeded reproducibility and input validation."""

import pytest
import torch

from pipo.errors import GenerationError
from pipo.ops.sampling import SamplingParams, make_generator, sample


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(4, 50) * 3


def test_greedy_is_argmax(logits):
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))


def test_top_k_one_is_greedy(logits):
    params = SamplingParams(temperature=1.5, top_k=1, seed=1)
    for _ in range(5):
        assert torch.equal(sample(logits, params, make_generator(params)), logits.argmax(-1))


def test_tiny_top_p_is_greedy(logits):
    params = SamplingParams(temperature=1.0, top_p=1e-6, seed=1)
    gen = make_generator(params)
    for _ in range(5):
        assert torch.equal(sample(logits, params, gen), logits.argmax(-1))


def test_top_k_draws_only_from_the_k_best(logits):
    params = SamplingParams(temperature=5.0, top_k=3, seed=2)
    gen = make_generator(params)
    best = logits.topk(3, dim=-1).indices
    for _ in range(50):
        ids = sample(logits, params, gen)
        assert (best == ids[:, None]).any(-1).all()


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=3)  # nucleus = {0, 1}
    gen = make_generator(params)
    seen = {int(sample(logits, params, gen)) for _ in range(200)}
    assert seen == {0, 1}


def test_same_seed_same_tokens(logits):
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=1234)

    def draw():
        gen = make_generator(params)
        return torch.stack([sample(logits, params, gen) for _ in range(10)])

    first, second = draw(), draw()
    assert torch.equal(first, second)
    assert len(set(first.flatten().tolist())) > 4  # actually random, not greedy


def test_unseeded_generators_differ(logits):
    params = SamplingParams(temperature=1.0)
    assert make_generator(params).initial_seed() != make_generator(params).initial_seed()


@pytest.mark.parametrize("params, words", [
    (SamplingParams(temperature=-0.1), "Temperature"),
    (SamplingParams(temperature=float("nan")), "Temperature"),
    (SamplingParams(temperature=1.0, top_p=0.0), "top_p"),
    (SamplingParams(temperature=1.0, top_p=1.5), "top_p"),
    (SamplingParams(temperature=1.0, top_k=-1), "top_k"),
    (SamplingParams(temperature=1.0, top_k=2.5), "top_k"),
    (SamplingParams(seed=-3), "Seed"),
])
def test_invalid_values_raise_generation_error(params, words):
    with pytest.raises(GenerationError, match=words):
        params.validate()
    with pytest.raises(GenerationError):
        sample(torch.zeros(1, 4), params)


def test_valid_defaults():
    SamplingParams().validate()
    SamplingParams(temperature=0.7, top_k=40, top_p=1.0, seed=0).validate()
