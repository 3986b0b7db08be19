"""``pipo generate``: one prompt streamed to the terminal, or a JSONL batch with a progress bar."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from pipo.cli_options import add_engine_options, add_model_option, check, open_engine, positive_int
from pipo.errors import PipoError
from pipo.ops.sampling import SamplingParams


def add_generate(sub) -> None:
    """Register the ``generate`` subcommand."""
    p = sub.add_parser("generate", help="generate text from a prompt or a JSONL file of prompts",
                       description="Generate text. Greedy unless --temperature > 0.")
    p.add_argument("prompt", nargs="?", help="the prompt (streams the completion to stdout)")
    add_model_option(p)
    p.add_argument("--max-new-tokens", "-n", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--input", type=Path, help="JSONL file: one {\"prompt\": ...} per line")
    p.add_argument("--output", type=Path, help="JSONL file to write completions to")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch (--input)")
    add_engine_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``pipo generate``."""
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    sampling.validate()
    check((args.prompt is None) != (args.input is None),
          "give either a prompt or --input FILE (not both, not neither)")
    check(args.input is None or args.output is not None, "--input needs --output FILE")
    check(args.output is None or args.input is not None, "--output needs --input FILE")
    prompts = read_prompts(args.input) if args.input else None
    with open_engine(args) as engine:
        if prompts is None:
            return _stream_one(engine, args, sampling)
        return _run_batch(engine, args, sampling, prompts)


def _stream_one(engine, args, sampling: SamplingParams) -> int:
    # The prompt is echoed with the first piece, so an error before generation prints alone.
    pending = [] if args.chat else [args.prompt]

    def show(_row: int, piece: str) -> None:
        sys.stdout.write("".join(pending) + piece)
        pending.clear()
        sys.stdout.flush()

    engine.generate(args.prompt, args.max_new_tokens, sampling, chat=args.chat,
                    system=args.system, on_text=show)
    sys.stdout.write("".join(pending) + "\n")
    return 0


def read_prompts(path: Path) -> list[dict]:
    """Records of a JSONL prompt file; each line an object with a string ``prompt``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PipoError(f"no such input file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipoError(f"cannot read {path}: {exc}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipoError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise PipoError(f"{path}:{number}: expected an object with a string \"prompt\"")
        records.append(record)
    check(bool(records), f"{path} holds no prompts")
    return records


def _run_batch(engine, args, sampling: SamplingParams, records: list[dict]) -> int:
    from tqdm import tqdm

    results = []
    with tqdm(total=len(records), unit="prompt", file=sys.stderr) as bar:
        for start in range(0, len(records), args.batch_size):
            batch = records[start:start + args.batch_size]
            texts = engine.generate([r["prompt"] for r in batch], args.max_new_tokens, sampling,
                                    chat=args.chat, system=args.system)
            results += [{**r, "completion": t} for r, t in zip(batch, texts)]
            bar.update(len(batch))
    write_jsonl_atomic(args.output, results)
    return 0


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    """Write ``records`` as JSONL via a temporary file and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
