"""Tree speculation (``Speculator(..., budget=N)``): greedy output token-identical to plain greedy
(transformers' tokens) for every draft kind and two families (every placement: test_speculate.py's
``test_every_placement``, tree case); the rejected tree
KV never leaks and the accepted tokens out of place are re-fed (both checks fail without them);
tree building, ordering and the argmax walk."""

from __future__ import annotations

import pytest
import torch

import pipo
import pipo.engine.speculate_tree as speculate_tree
from pipo.engine.batch import Batch
from pipo.engine.draft_tree import DraftTree, TreeBuilder, accepted_path, depth_first, trie
from pipo.engine.drafts import NgramDraft, make_draft
from pipo.engine.speculate import Speculator
from pipo.ops.sampling import SamplingParams, make_generator, probabilities
from tests.engine.test_speculate import NEW, PROMPTS, _draft_model
from tests.e2e.conftest import build_model, hf_greedy

BUDGET = 8


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{family: (path, draft model path, transformers' greedy tokens of PROMPTS)}."""
    out = {}
    for family in ("llama", "opt"):
        path = tmp_path_factory.mktemp(f"tree-spec-{family}")
        model = build_model(family, path)
        draft = _draft_model(family, tmp_path_factory.mktemp(f"tree-draft-{family}"))
        out[family] = (path, draft, [t for t, _ in hf_greedy(model, PROMPTS, NEW)])
    return out


def _speculate(engine, kind: str, draft_path: str, overlap: bool = True):
    draft = make_draft(draft_path if kind == "model" else kind, engine, 96, group_size=128)
    spec = Speculator(engine, draft, k=3, budget=BUDGET, overlap=overlap)
    try:
        return spec.generate_ids(PROMPTS, NEW).tokens, spec
    finally:
        draft.close()


@pytest.mark.parametrize(("kind", "overlap"), [("ngram", True), ("int4", True), ("int4", False),
                                               ("model", True), ("model", False)],
                         ids=["ngram", "int4-in-dag", "int4-before", "model-in-dag", "model-before"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_greedy_tree_speculation_is_token_identical(families, family, kind, overlap):
    path, draft_path, want = families[family]
    with pipo.load(path) as engine:
        tokens, spec = _speculate(engine, kind, draft_path, overlap)
    assert tokens == want
    assert spec.stats.drafted > 0
    assert spec.stats.passes < len(PROMPTS) * NEW or kind == "model"  # a random model: no luck
    assert max(spec.stats.verify_s) <= BUDGET


class SecondChildDraft:
    """A tree whose first child is junk and whose second branch is the right continuation
    (``want``): every accepted path sits out of place, so its KV must be re-fed."""

    name = "second-child"

    def __init__(self, prompt: list[int], want: list[int]):
        self.full = prompt + want

    def reset(self, prompt):
        pass

    def propose_tree(self, tokens, budget, depth):
        right = self.full[len(tokens):len(tokens) + depth]
        junk = [(t * 5 + 1) % 128 for t in right]
        return depth_first(junk + right, list(range(-1, len(junk) - 1)) +
                           [-1] + list(range(len(junk), len(junk) + len(right) - 1)),
                           [1.0] * len(junk) + [0.0] * len(right))

    def rollback(self, committed):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("options", [{}, {"placement": "host", "kv_offload": True}])
def test_rejected_tree_kv_never_leaks_and_out_of_place_tokens_are_re_fed(families, monkeypatch,
                                                                         options):
    path, _, want = families["llama"]
    prompt = PROMPTS[0]

    def run(budget=BUDGET):  # the draft's trees have 2 x depth nodes whatever the budget
        spec = Speculator(engine, SecondChildDraft(prompt, want[0]), k=3, budget=budget)
        return spec.generate_ids([prompt], NEW).tokens[0], spec

    with pipo.load(path, **options) as engine:
        tokens, spec = run()
        assert tokens == want[0]
        assert spec.stats.accepted > 0 and spec.stats.passes < NEW  # right branches accepted
        with monkeypatch.context() as m:  # no re-feed: claim the whole path is in place
            m.setattr(speculate_tree, "in_place", len)
            assert run()[0] != want[0]
        with monkeypatch.context() as m:  # no rollback: the tree's KV stays
            m.setattr(Batch, "truncate", lambda self, row, length: None)
            assert run(budget=16 * NEW)[0] != want[0]  # room for the KV never discarded


def test_trie_merges_shared_prefixes_depth_first():
    tree = trie([[1, 2, 3], [1, 4], [5]], budget=10)
    assert tree.tokens == [1, 2, 3, 4, 5] and tree.parents == [-1, 0, 1, 0, -1]
    assert len(trie([[1, 2, 3], [1, 4], [5]], budget=3)) == 3


def test_ngram_tree_holds_several_matches():
    tree = NgramDraft().propose_tree([1, 2, 7, 8, 1, 2, 9, 6, 1, 2], budget=8, depth=2)
    assert tree.tokens == [9, 6, 7, 8] and tree.parents == [-1, 0, -1, 2]


def test_accepted_path_follows_the_targets_choice():
    tree = DraftTree(tokens=[5, 6, 7, 8], parents=[-1, 0, 0, -1])
    # the target's choice after the root, then after each node
    assert accepted_path(tree, [5, 7, 0, 1, 2].__getitem__) == ([0, 2], 1)
    assert accepted_path(tree, [9, 0, 0, 0, 0].__getitem__) == ([], 9)


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_tree_acceptance_has_the_targets_distribution():
    """Emitted tokens of one tree round on a toy vocabulary (5 tokens): the first is distributed as
    the target's p at the root, the second (after an accepted child) as p at that child
    (chi-square, df = 4, fixed seed)."""
    sampling = SamplingParams(temperature=0.8, seed=3)
    generator = make_generator(sampling)
    tree = DraftTree(tokens=[1, 3, 0, 2], parents=[-1, 0, -1, -1])  # 1 -> 3; siblings 0, 2
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 0.0],  # root
                           [0.0, 0.3, -0.5, 1.5, 0.2],  # after 1
                           [0.4, 0.0, 0.0, 0.0, 0.0],   # after 1, 3
                           [2.0, -1.0, 0.0, 1.0, 0.5],  # after 0
                           [0.0, 0.0, 0.0, 0.0, 0.0]])  # after 2
    p = probabilities(logits, sampling)
    first, second = torch.zeros(5), torch.zeros(5)
    for _ in range(20000):
        path, bonus = accepted_path(tree, speculate_tree.target_choice(logits, sampling,
                                                                       generator))
        emitted = [tree.tokens[i] for i in path] + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == 1:
            second[emitted[1]] += 1
    assert _chi2(first, p[0]) < 18.5 and _chi2(second, p[1]) < 18.5  # df = 4, p = 0.001
    assert second.sum() > 5000  # the child was reached often


@pytest.mark.parametrize("kind", ["ngram", "int4"])
def test_sampling_through_a_tree_runs_and_top_k_1_equals_greedy(families, kind):
    path, draft_path, want = families["llama"]
    with pipo.load(path) as engine:
        draft = make_draft(kind, engine, 96, group_size=128)
        spec = Speculator(engine, draft, k=3, budget=BUDGET)
        one = SamplingParams(temperature=1.0, top_k=1, seed=5)   # a draw from a one-hot p
        assert spec.generate_ids(PROMPTS, NEW, one).tokens == want
        warm = spec.generate_ids(PROMPTS, NEW, SamplingParams(temperature=0.7, seed=5)).tokens
        draft.close()
    assert [len(t) for t in warm] == [NEW, NEW] and spec.stats.accepted > 0


class FixedDraft:
    """Log-probabilities favouring token (parent's token + 1), then + 2."""

    def tree_root(self, tokens):
        return self._logprobs([tokens[-1]])

    def tree_step(self, tokens, parents):
        return self._logprobs(tokens)

    @staticmethod
    def _logprobs(tokens):
        out = torch.full((len(tokens), 16), -10.0)
        for i, t in enumerate(tokens):
            out[i, (t + 1) % 16], out[i, (t + 2) % 16] = -0.1, -2.0
        return out


def test_tree_builder_respects_budget_and_steps_most_likely_child_first():
    builder = TreeBuilder(FixedDraft(), [0], budget=6, steps=3)
    for _ in range(5):
        builder.step()
    tree = builder.result()
    assert len(tree) == 6 and tree.depth() <= 3
    assert tree.tokens[:3] == [1, 2, 3] and tree.parents[:3] == [-1, 0, 1]  # the likely chain first


def test_tree_builder_shapes_the_tree_by_the_sampling_distribution():
    # top-k 1: only each node's likeliest child can be drawn, so the tree is that chain; shaped by
    # the draft's plain probabilities it would hold the second children too (the test above)
    builder = TreeBuilder(FixedDraft(), [0], budget=6, steps=3,
                          sampling=SamplingParams(temperature=0.8, top_k=1))
    for _ in range(3):
        builder.step()
    tree = builder.result()
    assert tree.tokens == [1, 2, 3] and tree.parents == [-1, 0, 1]


def test_tree_builder_prefers_shallow_siblings_when_the_temperature_flattens_the_draft():
    def shape(temperature):
        builder = TreeBuilder(FixedDraft(), [0], budget=6, steps=3,
                              sampling=SamplingParams(temperature=temperature))
        for _ in range(3):
            builder.step()
        return builder.result()

    # the last two places: a third token down the likely chain, or second choices at depth 2
    assert shape(0.2).depth() == 3     # sharp: the chain 1 -> 2 -> 3 is almost sure
    assert shape(5.0).depth() == 2     # flat: second choices are nearly as likely as the first


class CountingDraft(FixedDraft):
    """A FixedDraft that records the nodes each tree step evaluates."""

    def __init__(self):
        self.evaluated: list[list[int]] = []

    def tree_step(self, tokens, parents):
        self.evaluated.append(list(tokens))
        return super().tree_step(tokens, parents)


def test_tree_builder_leaves_the_nodes_that_fill_the_budget_unevaluated():
    draft = CountingDraft()
    builder = TreeBuilder(draft, [0], budget=4, steps=3)   # width 2: root, 2 nodes, 2 nodes
    for _ in range(3):
        builder.step()
    tree = builder.result()
    assert draft.evaluated == [[1, 2]]  # the second pair's children could never join the tree
    assert tree.tokens == [1, 2, 3, 2] and tree.parents == [-1, 0, 0, -1]  # 1 -> (2, 3); 2


def test_tree_drafting_runs_inside_the_verify_pass_dag(families):
    path, _, want = families["opt"]
    with pipo.load(path, placement="host", trace=True) as engine:
        draft = make_draft("int4", engine, 96, group_size=64)
        spec = Speculator(engine, draft, k=3, budget=BUDGET)
        assert spec.generate_ids(PROMPTS[:1], NEW).tokens == want[:1]
        draft.close()
    runs = [s for s in spec.step_stats if any(r.name.startswith("DraftStep") for r in s.records)]
    assert runs  # each tree round: draft steps, then the pass, in one run
    steps = [r for r in runs[0].records if r.name.startswith("DraftStep")]
    assert 1 <= len(steps) <= spec.k_max
    first_load = min(r.start_s for r in runs[0].records if r.name.startswith("LoadWeight"))
    assert first_load < max(r.end_s for r in steps)  # loads start before drafting ends
