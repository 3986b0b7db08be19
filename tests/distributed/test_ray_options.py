"""``--ray`` options refused with one line before any cluster starts; without the extra, the
install command. No Ray needed (its absence is simulated)."""

from __future__ import annotations

import json
import pickle
import sys

import pytest

from pipo.cli import main
from pipo.distributed.job import RAY_MISSING
from pipo.errors import DeviceMemoryTooSmall


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    return path


def generate(src, *extra):
    return main(["generate", "--input", str(src), "--output", str(src.with_name("out.jsonl")),
                 *extra])


def test_without_the_extra_ray_is_one_line_with_the_install_command(monkeypatch, capsys, src):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert generate(src, "--ray") == 2
    assert capsys.readouterr().err == f"pipo: error: {RAY_MISSING}\n"
    assert sorted(p.name for p in src.parent.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("extra,message", [
    (["--workers", "2"], "--workers and --gpus-per-worker need --ray"),
    (["--gpus-per-worker", "1"], "--workers and --gpus-per-worker need --ray"),
    (["--ray", "--gpus-per-worker", "1"], "--gpus-per-worker needs --device cuda"),
    (["--ray", "--gpus-per-worker", "-1"], "--gpus-per-worker must be at least 0, got -1"),
    (["--ray", "--device", "cuda", "--gpus-per-worker", "0"],
     "--device cuda with --ray needs --gpus-per-worker above 0"),
    (["--ray", "--device", "cuda:1"], "with --ray, use --device cpu or cuda (not cuda:1)"),
])
def test_a_bad_ray_option_is_one_line(monkeypatch, capsys, src, extra, message):
    monkeypatch.setitem(sys.modules, "ray", None)  # refused before Ray is even imported
    assert generate(src, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pipo: error: {message}") and err.count("\n") == 1


def test_ray_needs_an_input_file(capsys):
    assert main(["generate", "Hello", "--ray"]) == 2
    assert capsys.readouterr().err == "pipo: error: --ray needs --input FILE\n"


def test_a_device_memory_refusal_survives_pickling_as_itself():
    # a worker's refusal travels to the driver pickled
    error = pickle.loads(pickle.dumps(DeviceMemoryTooSmall(1024, 2**20, 3 * 2**19)))
    assert error.for_cli() == DeviceMemoryTooSmall(1024, 2**20, 3 * 2**19).for_cli()


def test_an_address_where_no_cluster_listens_is_one_line(capsys, src):
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e .[ray]")
    import socket

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        assert generate(src, "--ray", address) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pipo: error: --ray {address}: no Ray cluster answers there")
    assert err.count("\n") == 1
