"""``generate --input/--output``: every line checked before generating (bad lines named
``file:line``), finished batches written as they complete, ``OUTPUT`` only ever complete and an
interrupted run's work kept in ``OUTPUT.partial``."""

from __future__ import annotations

import json

import pytest

from pipo.cli import main
from pipo.engine import Engine
from pipo.errors import GenerationError
from tests.cli.tiny_text_model import build_text_model

CONTEXT = 256  # the tiny model's max_position_embeddings; its tokens are characters


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_text_model(tmp_path_factory.mktemp("jsonl-model"))


def write_prompts(path, *prompts):
    path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def run(model, src, out, *extra):
    return main(["generate", "--model", str(model), "--input", str(src), "--output", str(out),
                 "-n", "3", "--batch-size", "1", *extra])


@pytest.fixture
def calls(monkeypatch):
    """Records generate calls; ``calls.then[i]`` (a callable) runs first at call i."""
    real = Engine.generate

    class Calls(list):
        then: dict = {}

    seen = Calls()

    def generate(self, prompts, *args, **kwargs):
        seen.append(list(prompts))
        if len(seen) in seen.then:
            seen.then[len(seen)]()
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", generate)
    return seen


@pytest.mark.parametrize("bad,fragment", [
    ("", "the prompt is empty"),
    ("x" * (CONTEXT - 2), f"exceeds the model's context of {CONTEXT} tokens"),
])
def test_a_bad_line_is_named_before_anything_is_generated(capsys, model, tmp_path, calls, bad,
                                                          fragment):
    src = write_prompts(tmp_path / "in.jsonl", "Hello", "World", bad)
    assert run(model, src, tmp_path / "out.jsonl") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pipo: error: {src}:3: ") and fragment in err and err.count("\n") == 1
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_each_batch_is_on_disk_before_the_next_starts(model, tmp_path, calls):
    src, out = write_prompts(tmp_path / "in.jsonl", "a", "b", "c"), tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    lines_seen = []
    calls.then = {n: lambda: lines_seen.append(len(partial.read_text().splitlines()))
                  for n in (2, 3)}
    assert run(model, src, out) == 0
    assert lines_seen == [1, 2] and not partial.exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2] and all("completion" in r for r in rows)


def test_an_interrupted_run_keeps_its_finished_batches_in_a_partial_file(capsys, model, tmp_path,
                                                                        calls):
    src, out = write_prompts(tmp_path / "in.jsonl", "a", "b", "c"), tmp_path / "out.jsonl"

    def interrupt():
        raise KeyboardInterrupt

    calls.then = {3: interrupt}
    assert run(model, src, out) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"pipo: interrupted; 2 of 3 completions kept in {out}.partial"
    assert not out.exists()
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl.partial").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1]


def test_a_failure_mid_run_says_what_was_kept_and_one_before_any_batch_leaves_nothing(
        capsys, model, tmp_path, calls):
    src, out = write_prompts(tmp_path / "in.jsonl", "a", "b"), tmp_path / "out.jsonl"

    def fail():
        raise GenerationError("the device fell over")

    calls.then = {2: fail}
    assert run(model, src, out) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"the device fell over (1 of 2 completions kept in {out}.partial)\n")
    calls.clear()
    calls.then = {1: fail}
    assert run(model, src, out) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # the stale partial is gone
