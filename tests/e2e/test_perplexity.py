"""``pipo perplexity``: the dense path's perplexity equals transformers' on the same tiny model."""

from __future__ import annotations

import math

import pytest
import torch

import pipo
from pipo.cli import main
from pipo.engine.perplexity import perplexity, windows
from tests.cli.tiny_text_model import build_text_model
from tests.e2e.conftest import build_model

IDS = [int(i) for i in torch.randint(0, 128, (45,), generator=torch.Generator().manual_seed(7))]


def hf_perplexity(model, ids: list[int], window: int, stride: int) -> float:
    """Hugging Face's recipe: per window, labels -100 on the context the previous window scored,
    the model's own shifted cross-entropy loss times the number of scored tokens."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(x, labels=labels).loss
        n_valid = int((labels[:, 1:] != -100).sum())
        total, count = total + float(loss) * n_valid, count + n_valid
        prev_end = end
        if end == len(ids):
            break
    return math.exp(total / count)


@pytest.mark.parametrize("window,stride", [(16, 8), (45, 45), (20, 7), (64, 64)])
def test_dense_perplexity_equals_transformers(tmp_path, window, stride):
    model = build_model("llama", tmp_path)
    with pipo.load(tmp_path, dtype="float32") as engine:
        ours = perplexity(engine, IDS, window=window, stride=stride)
    theirs = hf_perplexity(model, IDS, window, stride)
    assert ours.n_scored == len(IDS) - 1
    assert ours.perplexity == pytest.approx(theirs, rel=1e-5)


def test_every_token_but_the_first_is_scored_once():
    for n, window, stride in [(45, 16, 8), (10, 10, 10), (11, 4, 3), (2, 8, 8), (100, 30, 1)]:
        scored = [begin + j for begin, end, first in windows(n, window, stride)
                  for j in range(first, end - begin)]
        assert scored == list(range(1, n))
        assert all(end - begin <= window for begin, end, _ in windows(n, window, stride))


def test_int4_path_perplexity_is_close_to_dense(tmp_path):
    build_model("llama", tmp_path)
    with pipo.load(tmp_path, dtype="float32", weights="int4", group_size=32) as engine:
        exact = perplexity(engine, IDS, window=16, stride=8).perplexity  # the fp32 int4 path
    with pipo.load(tmp_path, weights="int4", group_size=32) as engine:
        packed = perplexity(engine, IDS, window=16, stride=8).perplexity  # torch's kernel, bf16
    assert packed == pytest.approx(exact, rel=0.02)


def test_cli_prints_perplexity_and_refuses_bad_windows(tmp_path, capsys):
    model = build_text_model(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    assert main(["perplexity", str(text), "--model", str(model), "--window", "32", "--stride", "16",
                 "--max-tokens", "100", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "over 100 tokens (99 scored; window 32, stride 16" in out
    assert float(out.split()[1]) > 1.0
    assert main(["perplexity", str(text), "--model", str(model), "--window", "8", "--stride", "9"]) == 2
    assert "--stride (9) must not exceed --window (8)" in capsys.readouterr().err
    assert main(["perplexity", str(tmp_path / "missing.txt"), "--model", str(model)]) == 2
