"""Speculative decoding: greedy output token-identical to plain greedy (transformers' tokens on
tiny models of every family) for every draft kind and placement; rejected KV never leaks; the
sampling acceptance rule reproduces the target distribution (chi-square, fixed seed)."""

from __future__ import annotations

import pytest
import torch

import pipo
from pipo.engine.batch import Batch
from pipo.engine.drafts import DraftError, NgramDraft, make_draft
from pipo.engine.speculate import Speculator, accept
from pipo.ops.sampling import SamplingParams, make_generator, probabilities
from tests.e2e.conftest import FAMILY_CONFIGS, build_model, hf_greedy, make_config

PROMPTS = [[3, 17, 42, 8, 99, 5, 61, 3, 17, 42], [7, 12, 88]]
NEW = 16
DRAFTS = ["ngram", "int4", "model"]


def _draft_model(family: str, path, vocab: int = 128) -> str:
    """A second random model of ``family`` (another seed), saved at ``path``."""
    from transformers import AutoModelForCausalLM

    config = make_config(family)
    config.vocab_size = vocab
    torch.manual_seed(99)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{family: (path, draft model path, transformers' greedy tokens of PROMPTS)}."""
    out = {}
    for family in FAMILY_CONFIGS:
        path = tmp_path_factory.mktemp(f"spec-{family}")
        model = build_model(family, path)
        draft = _draft_model(family, tmp_path_factory.mktemp(f"spec-draft-{family}"))
        out[family] = (path, draft, [t for t, _ in hf_greedy(model, PROMPTS, NEW)])
    return out


def _speculate(engine, kind: str, draft_path: str, k: int = 3, budget: int | None = None
               ) -> tuple[list, Speculator]:
    draft = make_draft(draft_path if kind == "model" else kind, engine, 96, group_size=128)
    spec = Speculator(engine, draft, k=k, budget=budget)
    try:
        return spec.generate_ids(PROMPTS, NEW).tokens, spec
    finally:
        draft.close()


@pytest.mark.parametrize("kind", DRAFTS)
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_greedy_speculation_is_token_identical(families, family, kind):
    path, draft_path, want = families[family]
    with pipo.load(path) as engine:
        tokens, spec = _speculate(engine, kind, draft_path)
    assert tokens == want
    assert spec.stats.passes < len(PROMPTS) * NEW or kind != "ngram"


@pytest.mark.parametrize("budget", [None, 8], ids=["chain", "tree"])
@pytest.mark.parametrize("kind", DRAFTS)
@pytest.mark.parametrize("options", [{"placement": "host"}, {"placement": "host", "kv_offload": True},
                                     {"micro_batch": 1, "kv_offload": True}, {"placement": "disk"}],
                         ids=["host", "host+kv-offload", "kv-offload", "disk"])
def test_every_placement(families, tmp_path, kind, options, budget):
    from pipo.io.source import open_model
    from pipo.io.store import convert

    path, draft_path, want = families["llama"]
    if options.get("placement") == "disk":
        path = convert(open_model(path), tmp_path / "store", weights="fp32")
    with pipo.load(path, **options) as engine:
        tokens, _ = _speculate(engine, kind, draft_path, budget=budget)
    assert tokens == want


class WrongDraft:
    """Proposes junk: every round's drafts are rejected (their KV must be discarded)."""

    name = "wrong"

    def reset(self, prompt):
        pass

    def propose(self, tokens, k, sampling, generator):
        return [(tokens[-1] * 7 + i) % 128 for i in range(k)], None

    def rollback(self, committed):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("options", [{}, {"placement": "host", "kv_offload": True}])
def test_rejected_kv_never_leaks(families, monkeypatch, options):
    path, _, want = families["qwen2"]
    with pipo.load(path, **options) as engine:
        spec = Speculator(engine, WrongDraft(), k=4, adaptive=False)
        assert spec.generate_ids(PROMPTS, NEW).tokens == want
        assert spec.stats.accepted < spec.stats.drafted
        monkeypatch.setattr(Batch, "truncate", lambda self, row, length: None)  # no rollback
        skipped = Speculator(engine, WrongDraft(), k=4, adaptive=False)
        skipped.k_max = 4 * NEW  # room for the KV that is never discarded
        assert skipped.generate_ids(PROMPTS, NEW).tokens != want  # the check has teeth


@pytest.mark.parametrize("budget", [None, 8], ids=["chain", "tree"])
def test_draft_kv_is_rolled_back(families, budget):
    """The draft's KV keeps only committed tokens: it drafts as a fresh draft would."""
    path, _, _ = families["mistral"]
    with pipo.load(path) as engine:
        draft = make_draft("int4", engine, 96, group_size=32)
        spec = Speculator(engine, draft, k=4, budget=budget)
        tokens = spec.generate_ids(PROMPTS[:1], NEW).tokens[0]
        assert spec.stats.accepted < spec.stats.drafted  # some drafts were rejected
        seq = PROMPTS[0] + tokens
        fresh = make_draft("int4", engine, 96, group_size=32)
        greedy = SamplingParams()
        assert draft.propose(seq, 4, greedy, None) == fresh.propose(seq, 4, greedy, None)
        draft.close()
        fresh.close()


def test_a_draft_of_another_vocabulary_is_refused(families, tmp_path):
    path, _, _ = families["llama"]
    other = _draft_model("llama", tmp_path / "other", vocab=96)
    with pipo.load(path) as engine, pytest.raises(DraftError, match="vocabulary has 96"):
        make_draft(other, engine, 64)


def test_ngram_continues_the_latest_longest_match():
    draft = NgramDraft()
    greedy = SamplingParams()
    assert draft.propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2, greedy, None) == ([7, 5], None)
    assert draft.propose([4, 4, 8, 1], 3, greedy, None) == ([], None)


@pytest.mark.parametrize("draft_kind", ["model", "one-hot"])
def test_sampling_acceptance_reproduces_the_target_distribution(draft_kind):
    """The first emitted token of a round is distributed as the target's p (chi-square, df=5)."""
    sampling = SamplingParams(temperature=1.0, seed=7)
    generator = make_generator(sampling)
    target = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0.3, 0.2, 0.1, 0.0, 0.0, 0.0]])
    p = probabilities(target[:1], sampling)[0]
    q = torch.tensor([0.05, 0.4, 0.3, 0.1, 0.1, 0.05])
    counts = torch.zeros(6)
    n = 20000
    for _ in range(n):
        if draft_kind == "model":
            x, dist = int(torch.multinomial(q, 1, generator=generator)), q[None]
        else:
            x, dist = 1, None  # a deterministic draft always proposing token 1
        accepted, nxt = accept(target, [x], dist, sampling, generator)
        counts[x if accepted else nxt] += 1
    expected = n * p
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # df = 5, p = 0.001


@pytest.mark.parametrize("overlap", [True, False])
def test_model_drafts_run_inside_the_verify_pass_dag_or_before_it(families, overlap):
    path, _, want = families["opt"]
    with pipo.load(path, placement="host", trace=True) as engine:
        draft = make_draft("int4", engine, 64, group_size=64)
        spec = Speculator(engine, draft, k=3, overlap=overlap)
        assert spec.generate_ids(PROMPTS[:1], NEW).tokens == want[:1]
        draft.close()
    in_dag = [r for s in spec.step_stats for r in s.records if r.name.startswith("DraftStep")]
    assert bool(in_dag) == overlap
    if overlap:  # the pass's first weight load starts before its drafting ends
        run = next(s for s in spec.step_stats if any(r.name.startswith("DraftStep")
                                                    for r in s.records))
        last_draft = max(r.end_s for r in run.records if r.name.startswith("DraftStep"))
        first_load = min(r.start_s for r in run.records if r.name.startswith("LoadWeight"))
        assert first_load < last_draft


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", DRAFTS)
@pytest.mark.parametrize("options", [{"placement": "host"}, {"placement": "host", "kv_offload": True}],
                         ids=["host", "host+kv-offload"])
def test_on_cuda_speculation_equals_plain_greedy(families, kind, options):
    path, draft_path, want = families["llama"]
    with pipo.load(path, device="cuda", dtype="float32", **options) as engine:
        plain = engine.generate_ids(PROMPTS, NEW).tokens
        tokens, _ = _speculate(engine, kind, draft_path)
    assert tokens == plain
    assert plain == want  # fp32 on the card: transformers' CPU tokens too
