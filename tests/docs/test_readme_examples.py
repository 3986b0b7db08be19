"""Every command and code block of README.md and docs/*.md runs as written on a fresh clone.

bash blocks run command by command (a heredoc or a trailing backslash continues a command), python
blocks run whole; each document in a temporary directory of its own, in document order, with this
test's interpreter and this checkout on ``PYTHONPATH``. A command passes when it exits 0 without a
traceback. The only rewrites (nothing else is changed):

- ``pipo`` / ``.venv/bin/pipo`` run as ``python -m pipo.cli``; ``python`` / ``.venv/bin/python``
  as this interpreter;
- ``pipo generate`` without ``-n`` gets ``-n 8`` (the default 64 tokens are slow on a CPU);
- ``pipo bench`` of the default (smollm) workload gets ``--batch 1 --gen-len 2 --repeats 1``.

Not run, each for the reason in :data:`NOT_RUN`: ``scripts/setup.sh`` and ``pip install`` (they
install from the network; CI runs setup before this suite), ``pytest`` (this suite itself), and
``--device cuda`` without a CUDA device.

A command ``pipo serve ... &`` starts that server in the background for the rest of its document
(the next command runs once it answers ``/health``; SIGTERM stops it, and it must exit 0, when the
document is done), so a document can show a client talking to it.

Fixtures, made in each document's directory: ``model_dir/``, the README's stand-in for "a Hugging
Face safetensors directory of your own": a tiny random llama with a character tokenizer
(:mod:`tests.cli.tiny_text_model`).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
NOT_RUN = {
    "scripts/setup.sh": "builds .venv from the network; CI runs it before this suite",
    "pip install": "installs packages from the network; this environment has them",
    "pytest": "this is the test suite itself",
}
CUDA_REASON = "needs a CUDA device"
SERVE_IN_BACKGROUND = re.compile(r"-m pipo\.cli serve\b.*&\s*$")
SHORT_GENERATION = " -n 8"
SHORT_BENCH = " --batch 1 --gen-len 2 --repeats 1"
pytestmark = pytest.mark.slow


def code_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of every fenced code block."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if current is None and line.startswith("```"):
            current = (line[3:].strip(), number + 1, [])
        elif current is not None and line.startswith("```"):
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
    return blocks


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` inside quotes stays)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def bash_commands(lines: list[str], first: int) -> list[tuple[int, str]]:
    """(line number, command) of a bash block: heredocs and backslash continuations joined."""
    commands, i = [], 0
    while i < len(lines):
        start, line = i, strip_comment(lines[i])
        i += 1
        if not line:
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + strip_comment(lines[i]).lstrip()
            i += 1
        marker = re.search(r"<<-?\s*'?(\w+)'?", line)
        if marker:
            body = []
            while i < len(lines) and lines[i] != marker.group(1):
                body.append(lines[i])
                i += 1
            line = "\n".join([line, *body, marker.group(1)])
            i += 1
        commands.append((first + start, line))
    return commands


def runnable(command: str, has_cuda: bool) -> tuple[str | None, list[str]]:
    """The command as it runs here (``None``: not at all) and the reasons for parts left out."""
    kept, reasons = [], []
    for part in command.split(" && "):
        reason = next((why for key, why in NOT_RUN.items() if key in part), None)
        if reason is None and "--device cuda" in part and not has_cuda:
            reason = CUDA_REASON
        if reason:
            reasons.append(f"{part.strip()}: {reason}")
        else:
            kept.append(rewrite(part))
    return (" && ".join(kept) if kept else None), reasons


def rewrite(part: str) -> str:
    """The rewrites of the module docstring, on one ``&&``-separated part of a command."""
    python = shlex.quote(sys.executable)
    part = re.sub(r"^(\s*)(?:\.venv/bin/)?pipo\b", rf"\1{python} -m pipo.cli", part)
    part = re.sub(r"^(\s*)(?:\.venv/bin/)?python\b", rf"\1{python}", part)
    if " -m pipo.cli generate" in part and not re.search(r"\s(-n|--max-new-tokens)\s", part):
        part += SHORT_GENERATION
    if " -m pipo.cli bench" in part and "--workload" not in part:
        part += SHORT_BENCH
    return part


def run(command: list[str], cwd: Path, where: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{output}"
    assert "Traceback" not in proc.stderr, f"{where} printed a traceback:\n{output}"


def start_server(line: str, cwd: Path, where: str):
    """(where, process) of a ``pipo serve ... &`` line, once it answers /health."""
    import time
    import urllib.request

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = shlex.split(line.rstrip().removesuffix("&"))
    port = argv[argv.index("--port") + 1] if "--port" in argv else "8000"
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, f"{where}: pipo serve exited {process.returncode}"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
            return where, process
        except OSError:
            assert time.monotonic() < deadline, f"{where}: pipo serve did not start"
            time.sleep(0.2)


def test_every_line_of_every_bash_block_is_in_one_command():
    for document in DOCUMENTS:
        for language, first, lines in code_blocks((ROOT / document).read_text()):
            if language != "bash":
                continue
            commands = bash_commands(lines, first)
            covered = sum(c.count("\n") + 1 for _, c in commands)
            content = [line for line in lines if strip_comment(line)]
            assert covered >= len(content), f"{document}:{first}: lines lost"
    readme = code_blocks((ROOT / "README.md").read_text())
    use = bash_commands(readme[1][2], readme[1][1])
    assert use[2][1].startswith("cat > prompts.jsonl <<'EOF'\n") and use[2][1].endswith("\nEOF")
    assert runnable("scripts/setup.sh && .venv/bin/pipo generate hi", False)[0] == \
        f"{shlex.quote(sys.executable)} -m pipo.cli generate hi{SHORT_GENERATION}"


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("document", DOCUMENTS)
def test_examples_run_as_written(document, tmp_path, capsys):
    import torch

    from tests.cli.tiny_text_model import build_text_model

    build_text_model(tmp_path / "model_dir")
    not_run, servers = [], []
    try:
        for language, first, lines in code_blocks((ROOT / document).read_text()):
            if language == "python":
                script = tmp_path / f"block_{first}.py"
                script.write_text("\n".join(lines) + "\n")
                run([sys.executable, str(script)], tmp_path, f"{document}:{first} (python block)")
            elif language == "bash":
                for number, command in bash_commands(lines, first):
                    line, reasons = runnable(command, torch.cuda.is_available())
                    not_run += [f"{document}:{number}: {r}" for r in reasons]
                    if line is not None and SERVE_IN_BACKGROUND.search(line):
                        servers.append(start_server(line, tmp_path, f"{document}:{number}"))
                    elif line is not None:
                        run(["bash", "-c", line], tmp_path, f"{document}:{number}: {command}")
    finally:
        for where, server in servers:
            server.send_signal(signal.SIGTERM)
            assert server.wait(120) == 0, f"{where}: pipo serve did not exit 0 on SIGTERM"
    with capsys.disabled():
        for entry in not_run:
            print(f"\n  not run: {entry}", end="")
    assert all(any(why in entry for why in (*NOT_RUN.values(), CUDA_REASON)) for entry in not_run)
