"""``pipo generate --speculate``: the same text as plain greedy generation, streamed or batched,
and clear refusals."""

from __future__ import annotations

import json

import pytest

from pipo.cli import main


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from tests.cli.tiny_text_model import build_text_model

    return build_text_model(tmp_path_factory.mktemp("spec-cli") / "model")


def _generate(model, *extra, capsys) -> str:
    assert main(["generate", "--model", str(model), "abcabcabc", "-n", "12", *extra]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", ["ngram", "int4"])
def test_speculation_prints_the_plain_text(text_model, capsys, kind):
    plain = _generate(text_model, capsys=capsys)
    assert _generate(text_model, "--speculate", kind, "--draft-tokens", "3",
                     "--draft-group-size", "32", capsys=capsys) == plain


@pytest.mark.parametrize("kind", ["ngram", "int4"])
def test_tree_speculation_prints_the_plain_text(text_model, capsys, kind):
    plain = _generate(text_model, capsys=capsys)
    assert _generate(text_model, "--speculate", kind, "--draft-budget", "6",
                     "--draft-group-size", "32", capsys=capsys) == plain


def test_jsonl_batches_speculate_too(text_model, tmp_path, capsys):
    src, plain, spec = tmp_path / "in.jsonl", tmp_path / "plain.jsonl", tmp_path / "spec.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p}) for p in ("abab", "hello hello")) + "\n")
    common = ["generate", "--model", str(text_model), "--input", str(src), "-n", "8"]
    assert main([*common, "--output", str(plain)]) == 0
    assert main([*common, "--output", str(spec), "--speculate", "ngram"]) == 0
    assert spec.read_text() == plain.read_text()


@pytest.mark.parametrize("draft", ["nothing", "int5", "NGRAM"])
def test_a_missing_draft_model_is_refused(text_model, tmp_path, capsys, draft):
    missing = str(tmp_path / draft) if draft == "nothing" else draft
    assert main(["generate", "--model", str(text_model), "hi", "-n", "2",
                 "--speculate", missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int4, ngram, off" in err[0] and missing in err[0]
