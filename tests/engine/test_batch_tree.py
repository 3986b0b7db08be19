"""Tree steps of a per-row batch (``Batch.step(..., parents=...)``) against transformers: every
tree node's logits equal transformers' logits of the path to it run alone (fp32), over two tree
steps, next to a chain row in the same pass, for every weight and KV placement."""

from __future__ import annotations

import pytest
import torch

import pipo
from pipo.errors import GenerationError
from tests.e2e.conftest import build_model
from tests.engine.test_batch import LOGIT_TOL, PLACEMENTS

PROMPT, OTHER = [3, 17, 42, 8, 99, 5, 61], [7, 12, 88]
# (tokens, parents) of two tree steps; parents index the open tree's tokens (-1: the prompt)
TREE = [([10, 20, 21, 30, 31, 11], [-1, 0, 0, 1, 2, -1]), ([40, 41, 50], [3, 5, 6])]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: (path, hf model)}: tiny llama and opt (rope and learned positions), an llama store."""
    from pipo.io.source import open_model
    from pipo.io.store import convert

    out = {}
    for family in ("llama", "opt"):
        path = tmp_path_factory.mktemp(f"tree-{family}")
        out[family] = (path, build_model(family, path))
    path, model = out["llama"]
    store = convert(open_model(path), tmp_path_factory.mktemp("tree-store") / "s", weights="fp32")
    out["llama-store"] = (store, model)
    return out


def _paths() -> list[list[int]]:
    """The token path from the prompt to every tree node, in tree order."""
    tokens = [t for step, _ in TREE for t in step]
    parents = [p for _, step in TREE for p in step]
    paths = []
    for token, parent in zip(tokens, parents, strict=True):
        paths.append((paths[parent] if parent >= 0 else []) + [token])
    return paths


def _hf_logits(model, prefix: list[int], path: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prefix + path])).logits[0, -1].float()


def _tree_logits(batch, row: int, chain_row: int | None) -> torch.Tensor:
    """Both tree steps' logits of ``row`` (a chain step of ``chain_row`` in the same passes)."""
    out = []
    for tokens, parents in TREE:
        feed = {row: tokens}
        if chain_row is not None:
            feed[chain_row] = [tokens[0] % 100, tokens[-1] % 100]
        out.append(batch.step(feed, logits="all", parents={row: parents})[row])
    return torch.cat(out)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_tree_nodes_equal_their_paths_run_alone(models, name):
    path, model = models[name]
    with pipo.load(path) as engine, engine.open_batch(rows=2, max_len=64) as batch:
        row = batch.admit(PROMPT)
        other = batch.admit(OTHER)
        batch.step({})
        ours = _tree_logits(batch, row, other)
        chain = [TREE[0][0][0] % 100, TREE[0][0][-1] % 100, TREE[1][0][0] % 100,
                 TREE[1][0][-1] % 100]
        chain_logits = batch.step({other: [1]}, logits="all")[other]
    want = torch.stack([_hf_logits(model, PROMPT, p) for p in _paths()])
    assert (ours - want).abs().max().item() <= LOGIT_TOL
    assert (chain_logits[0] - _hf_logits(model, OTHER, chain + [1])).abs().max() <= LOGIT_TOL


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_tree_steps_in_every_placement(models, tmp_path, name):
    options = dict(PLACEMENTS[name])
    path, model = models["llama-store" if options.get("placement") == "disk" else "llama"]
    if options.get("kv_disk_dir") == "KV":
        options["kv_disk_dir"] = str(tmp_path)
    with pipo.load(path, **options) as engine, engine.open_batch(rows=2, max_len=64) as batch:
        row = batch.admit(PROMPT)
        batch.step({})
        ours = _tree_logits(batch, row, None)
        # keep the path prompt -> 10 -> 20 (slots = positions), then decode after it
        batch.truncate(row, len(PROMPT) + 2)
        after = batch.step({row: [30]})[row][-1]
    want = torch.stack([_hf_logits(model, PROMPT, p) for p in _paths()])
    assert (ours - want).abs().max().item() <= LOGIT_TOL
    assert (after - _hf_logits(model, PROMPT, [10, 20, 30])).abs().max().item() <= LOGIT_TOL


def test_bad_parents_are_refused(models):
    path, _ = models["llama"]
    with pipo.load(path) as engine, engine.open_batch(rows=1, max_len=64) as batch:
        row = batch.admit(PROMPT)
        batch.step({})
        with pytest.raises(GenerationError, match="has parent 1"):
            batch.step({row: [1, 2]}, parents={row: [-1, 1]})
        with pytest.raises(GenerationError, match="one parent per new token"):
            batch.step({row: [1, 2]}, parents={row: [-1]})
        batch.truncate(row, len(PROMPT))
        batch.step({row: [1, 2]}, parents={row: [-1, -1]})
        with pytest.raises(GenerationError, match="open token tree"):
            batch.step({row: [3]})
