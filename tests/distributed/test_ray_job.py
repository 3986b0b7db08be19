"""``pipo generate --input --ray`` on a local Ray cluster started here (2 CPUs, one per module):
the same output as one process, invalid rows marked, a killed worker's batch retried, engines
closed, a worker's user error shown as one line."""

from __future__ import annotations

import json
import os
import time

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e .[ray]")
pytest.importorskip("ray.data", reason="the ray extra is not installed: pip install -e .[ray]")

from pipo.cli import build_parser, main  # noqa: E402
from pipo.cli_batch import read_prompts  # noqa: E402
from pipo.distributed.buckets import length_buckets  # noqa: E402
from pipo.distributed.job import run_ray_batch  # noqa: E402
from pipo.ops.sampling import SamplingParams  # noqa: E402
from tests.distributed.conftest import CONTEXT  # noqa: E402
from tests.distributed.predictors import MARKERS_ENV, DiesOnce, Records  # noqa: E402

# rows of very different lengths (1 to 150 tokens), some equal, so buckets and order matter
PROMPTS = ["Hello", "a", "The quick brown fox jumps over the lazy dog", "Hello", "xyz", "b" * 150,
           "Hi there", "q", "Grüße", "A" * 90 + "!", "Hello", "zz"]
OPTIONS = ["-n", "6", "--batch-size", "3"]


@pytest.fixture(scope="module")
def markers(tmp_path_factory):
    """A local cluster for this module; workers inherit the scratch directory's name."""
    path = tmp_path_factory.mktemp("ray-markers")
    os.environ[MARKERS_ENV] = str(path)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield path
    ray.shutdown()
    del os.environ[MARKERS_ENV]


def write_prompts(path, prompts):
    """One line per prompt, with fields of other kinds that must come back as they were."""
    path.write_text("".join(json.dumps({"id": i, "prompt": p, "meta": {"tags": ["é", None, 1.5]}},
                                       ensure_ascii=False) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def one_process(model, src, out):
    assert main(["generate", "--model", str(model), "--input", str(src), "--output", str(out),
                 *OPTIONS]) == 0
    return out.read_text()


def on_ray(model, src, out, *extra):
    return main(["generate", "--model", str(model), "--input", str(src), "--output", str(out),
                 *OPTIONS, "--ray", "--workers", "2", *extra])


def job_with(predictor, model, src, out):
    args = build_parser().parse_args(["generate", "--model", str(model), "--input", str(src),
                                      "--output", str(out), *OPTIONS, "--ray", "--workers", "2"])
    return run_ray_batch(args, SamplingParams(), read_prompts(src), predictor=predictor)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """One process's output for PROMPTS."""
    tmp = tmp_path_factory.mktemp("reference")
    return one_process(tiny_model, write_prompts(tmp / "in.jsonl", PROMPTS), tmp / "out.jsonl")


def test_two_workers_write_byte_for_byte_what_one_process_writes(markers, tiny_model, tmp_path,
                                                                 reference):
    src, out = write_prompts(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out.jsonl"
    assert on_ray(tiny_model, src, out) == 0
    assert out.read_text() == reference
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_an_invalid_row_gets_an_error_field_and_the_job_goes_on(markers, tiny_model, tmp_path,
                                                              reference, capsys):
    prompts = PROMPTS[:4] + ["", "x" * CONTEXT] + PROMPTS[4:]
    src, out = write_prompts(tmp_path / "in.jsonl", prompts), tmp_path / "out.jsonl"
    assert on_ray(tiny_model, src, out) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(prompts)))
    assert rows[4]["error"] == "the prompt is empty" and "completion" not in rows[4]
    assert rows[5]["error"].startswith(f"the prompt is {CONTEXT} tokens")
    good = [json.loads(line) for line in reference.splitlines()]
    assert [r["completion"] for r in rows[:4] + rows[6:]] == [r["completion"] for r in good]
    err = capsys.readouterr().err
    assert f'pipo: 2 of {len(prompts)} rows have an "error" field' in err
    assert f"(first: {src}:5: the prompt is empty)" in err


def test_a_worker_killed_mid_batch_is_retried_and_every_row_is_written_once_in_order(
        markers, tiny_model, tmp_path, reference):
    src, out = write_prompts(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out.jsonl"
    assert job_with(DiesOnce, tiny_model, src, out) == 0
    assert (markers / "died").read_text()  # a worker died holding that batch
    assert out.read_text() == reference


def test_workers_get_the_length_buckets_unchanged_and_close_their_engines(markers, tiny_model,
                                                                          tmp_path):
    src, out = write_prompts(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out.jsonl"
    assert job_with(Records, tiny_model, src, out) == 0
    planned = length_buckets([len(p) for p in PROMPTS], 3)  # a character is a token
    assert {p.name for p in markers.glob("batch-*")} == \
        {"batch-" + ",".join(map(str, b)) for b in planned}

    def pids(state):
        return {p.name.split("-")[1] for p in markers.glob(f"{state}-*")}

    # a worker still starting when the last batch is done opens its engine, then closes it
    deadline = time.monotonic() + 120
    while pids("closed") != pids("opened") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert pids("opened") and pids("closed") == pids("opened")


def test_a_batch_that_fails_in_a_worker_is_one_line_and_leaves_no_file(markers, tiny_model,
                                                                     tmp_path, capsys):
    src, out = write_prompts(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out.jsonl"
    assert on_ray(tiny_model, src, out, "--device-memory", "1KiB") == 2
    err = capsys.readouterr().err
    assert err.startswith("pipo: error: --device-memory 0.0MiB is too small") or \
        err.startswith("pipo: error: --device-memory"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.slow
def test_the_default_model_on_two_workers_writes_what_one_process_writes(markers, tmp_path):
    prompts = ["The capital of France is", "def fibonacci(n):", "Hi", "Once upon a time, a small "
               "robot", "The capital of Spain is", "1, 2, 3,"]
    src = write_prompts(tmp_path / "in.jsonl", prompts)
    options = ["--input", str(src), "-n", "8", "--batch-size", "2", "--threads", "1"]
    assert main(["generate", *options, "--output", str(tmp_path / "one.jsonl")]) == 0
    assert main(["generate", *options, "--output", str(tmp_path / "ray.jsonl"), "--ray",
                 "--workers", "2"]) == 0
    assert (tmp_path / "ray.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
