"""Output paths are checked before any work: one ``pipo: error:`` line, never a traceback after
the work is done. Unwritable places are real ones (tests run as root, so permission bits would not
do): a path under a regular file, and /sys, where nobody can create files."""

from __future__ import annotations

import pytest

from pipo.cli import main
from pipo.engine import Engine
from tests.cli.tiny_text_model import build_text_model

UNWRITABLE = "/sys"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_text_model(tmp_path_factory.mktemp("paths-model"))


@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test if anything is generated: the checks must come first."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("generated before the output path was checked")

    monkeypatch.setattr(Engine, "generate_ids", refuse)


def one_line_error(capsys, argv, *fragments) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipo: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _unwritable_is_real():
    try:
        open(f"{UNWRITABLE}/pipo-probe", "w").close()
    except OSError:
        return True
    return False


needs_unwritable = pytest.mark.skipif(not _unwritable_is_real(), reason=f"{UNWRITABLE} is writable")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Hello"}\n')
    return path


def test_generate_output_that_is_a_directory(capsys, model, prompts, tmp_path, no_generation):
    out = tmp_path / "out"
    out.mkdir()
    one_line_error(capsys, ["generate", "--model", str(model), "--input", str(prompts),
                            "--output", str(out)], "is a directory")


def test_generate_output_under_a_regular_file(capsys, model, prompts, no_generation):
    one_line_error(capsys, ["generate", "--model", str(model), "--input", str(prompts),
                            "--output", str(prompts / "out.jsonl")], "is not a directory")


@needs_unwritable
def test_generate_output_where_no_file_can_be_created(capsys, model, prompts, no_generation):
    one_line_error(capsys, ["generate", "--model", str(model), "--input", str(prompts),
                            "--output", f"{UNWRITABLE}/out.jsonl"], "cannot create files")


def test_graph_output_in_a_missing_directory(capsys, model, tmp_path, monkeypatch):
    monkeypatch.setattr(Engine, "plan_for", lambda *a: pytest.fail("loaded before checking -o"))
    one_line_error(capsys, ["graph", str(model), "-o", str(tmp_path / "nodir" / "g.png")],
                   "no such directory", "nodir")
    one_line_error(capsys, ["graph", str(model), "-o", str(tmp_path / "g.gif")], ".gif")


@needs_unwritable
def test_kv_disk_where_no_file_can_be_created(capsys, model):
    one_line_error(capsys, ["generate", "--model", str(model), "hi", "-n", "2",
                            "--kv-disk", UNWRITABLE], "--kv-disk", "cannot create files")


def test_kv_disk_that_is_a_file(capsys, model, prompts):
    one_line_error(capsys, ["generate", "--model", str(model), "hi", "-n", "2",
                            "--kv-disk", str(prompts)], "--kv-disk", "is not a directory")


def test_a_writable_kv_disk_directory_still_works(capsys, model, tmp_path):
    assert main(["generate", "--model", str(model), "hi", "-n", "2", "--kv-disk",
                 str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("hi")
    assert list(tmp_path.iterdir()) == []  # no probe file or scratch file left behind


@needs_unwritable
def test_bench_out_is_checked_before_measuring(capsys, tmp_path):
    one_line_error(capsys, ["bench", "--device", "cpu", "--workload", "quick", "--shape",
                            "tiny-opt", "--out", f"{UNWRITABLE}/bench.json"], "--out",
                   "cannot create files")
    one_line_error(capsys, ["bench", "--log", str(tmp_path)], "--log", "is a directory")
