"""``pipo generate --input FILE --output FILE --ray [ADDRESS]``: the JSONL job on Ray Data.

The driver (this process) reads and checks the file as ``pipo generate --input`` does, counts each
prompt's tokens, buckets rows by length (:func:`~pipo.distributed.buckets.length_buckets`) and
hands Ray Data one block per batch. A fixed pool of ``--workers`` actors, each one
:class:`~pipo.distributed.predictor.PipoPredictor` holding one engine, generates them; Ray retries
the batch of a worker that dies (actors restart, tasks retry: Ray Data's defaults). Rows come back
in any order and are written to ``OUTPUT.partial`` in input order as soon as every earlier row is
in; the file is renamed to ``OUTPUT`` once every row is written, exactly once. A row whose prompt
cannot be generated (empty, too long for the context) gets an ``error`` field instead of a
``completion``; the other rows go on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from pipo.cli_batch import PartialOutput, PromptLine
from pipo.cli_options import check, engine_options
from pipo.distributed.buckets import InputOrder, length_buckets
from pipo.distributed.predictor import GenerationConfig, PipoPredictor
from pipo.errors import PipoError

RAY_MISSING = "--ray needs the ray extra: pip install -e .[ray]"


def import_ray():
    """The ``ray`` module with Ray Data, or the one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the ray[data] extra, not bare ray
    except ImportError:
        raise PipoError(RAY_MISSING) from None
    return ray


def worker_resources(args) -> tuple[float, float]:
    """CPUs and GPUs Ray reserves for each worker, from ``--threads`` and ``--gpus-per-worker``."""
    on_cuda = args.device.startswith("cuda")
    check(args.device in ("cpu", "cuda"),
          f"with --ray, use --device cpu or cuda (not {args.device}): each worker computes on "
          f"the GPU Ray gives it, which it sees as cuda")
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else float(on_cuda)
    check(gpus >= 0, f"--gpus-per-worker must be at least 0, got {gpus:g}")
    check(not on_cuda or gpus > 0, "--device cuda with --ray needs --gpus-per-worker above 0")
    check(on_cuda or gpus == 0, "--gpus-per-worker needs --device cuda")
    return float(args.threads or 1), gpus


def generation_config(args, sampling) -> GenerationConfig:
    """The workers' config: the same engine options as one process, paths made absolute."""
    options = engine_options(args)
    if options.kv_disk_dir is not None:
        options = replace(options, kv_disk_dir=str(Path(options.kv_disk_dir).resolve()))
    model = args.model
    if model is not None and model != "default":
        model = str(Path(model).resolve())
    return GenerationConfig(model=model, options=options, max_new_tokens=args.max_new_tokens,
                            sampling=sampling, chat=args.chat, system=args.system,
                            threads=args.threads or 1)


def run_ray_batch(args, sampling, prompts: list[PromptLine], predictor=PipoPredictor) -> int:
    """Generate every prompt of ``args.input`` on Ray into ``args.output``; ``predictor`` is the
    ``map_batches`` callable class (a subclass of :class:`PipoPredictor`)."""
    cpus, gpus = worker_resources(args)
    ray = import_ray()
    config = generation_config(args, sampling)
    order = InputOrder(len(prompts))
    errors = []
    workers = args.workers or 1
    with ray_session(ray, args.ray, workers, cpus, gpus):
        batches = length_buckets(prompt_lengths(args, prompts), args.batch_size)
        dataset = _dataset(ray, prompts, batches, predictor, config, args.batch_size, workers,
                           (cpus, gpus))
        with PartialOutput(args.output, len(prompts)) as output, _ray_errors(ray):
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                records = _records(batch)
                errors += [(index, error) for index, _, error in records if error]
                output.append([r for index, record, _ in records
                               for r in order.add(index, record)])
            check(order.complete, f"{len(prompts) - order.released} rows did not come back")
    _report(args, prompts, errors)
    return 0


def prompt_lengths(args, prompts: list[PromptLine]) -> list[int]:
    """Each prompt's token count (with the chat template when ``--chat``), for bucketing."""
    from pipo.engine.text import encode_prompt
    from pipo.io.source import open_model

    source = open_model(args.model)  # only its tokenizer is read: encode_prompt's one need
    return [len(encode_prompt(source, p.prompt, args.chat, args.system)) for p in prompts]


@contextmanager
def ray_session(ray, address: str, workers: int, cpus: float, gpus: float):
    """This process's Ray session: the one already initialized (tests, notebooks), a new local
    cluster (``address`` empty) or the cluster at ``address``; ended here if started here."""
    tty = sys.stderr.isatty()
    _configure_data(ray, tty)
    if ray.is_initialized():
        yield
        return
    quiet = dict(logging_level=logging.WARNING if tty else logging.ERROR)
    _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(workers * cpus)),
                     include_dashboard=False, **quiet)
    except ConnectionError as exc:
        raise PipoError(f"--ray {address}: {str(exc).splitlines()[0]}") from None
    try:
        if not address:
            have = ray.cluster_resources().get("GPU", 0)
            check(workers * gpus <= have,
                  f"this machine has {have:g} GPUs; --workers {workers} x --gpus-per-worker "
                  f"{gpus:g} needs {workers * gpus:g}")
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Refuse a ``HOST:PORT`` where nothing listens: Ray itself would retry it for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # a local cluster, "auto" or a ray:// client address: Ray answers those quickly
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise PipoError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc}); "
                        f"start one with `ray start --head` or check the address") from None


def _configure_data(ray, tty: bool) -> None:
    """Ray Data's progress bars on a terminal, quiet otherwise; a worker's exception as itself."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = tty
    context.print_on_execution_start = False
    # a PipoError from a worker reaches the driver as that error, not as a generic wrapper
    context.raise_original_map_exception = True
    # a batch of a big model streamed from disk can take longer than Ray Data's 30 min default
    context.execution_no_progress_timeout_s = -1
    if not tty:  # what fails is said once, by the error raised here
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)


def _dataset(ray, prompts, batches, predictor, config, batch_size: int, workers: int,
             resources: tuple[float, float]):
    """One block per planned batch (each ``--batch-size`` rows but the last), mapped by a fixed
    pool of workers."""
    import pyarrow as pa

    cpus, gpus = resources
    blocks = [pa.table({"index": batch,
                        "prompt": [prompts[i].prompt for i in batch],
                        "record": [json.dumps(prompts[i].record) for i in batch]})
              for batch in batches]
    # every block but the last has exactly batch_size rows, so Ray Data's bundling (blocks are
    # joined until a bundle holds batch_size rows) hands each planned batch over unchanged
    return ray.data.from_blocks(blocks).map_batches(
        predictor, fn_constructor_kwargs={"config": config}, batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_cpus=cpus, num_gpus=gpus or None, udf_modifying_row_count=False)


def _records(batch) -> list[tuple[int, dict, str]]:
    """(input index, output record, error or "") of each row of a finished batch."""
    out = []
    for index, record, completion, error in zip(batch["index"], batch["record"],
                                                batch["completion"], batch["error"]):
        record = json.loads(record)
        if error:
            record["error"] = str(error)
        else:
            record["completion"] = str(completion)
        out.append((int(index), record, str(error)))
    return out


@contextmanager
def _ray_errors(ray):
    """A PipoError raised in a worker (a plan that does not fit, say) as its own one line."""
    try:
        yield
    except Exception as exc:
        cause = _pipo_cause(ray, exc)
        if cause is None or cause is exc:
            raise
        raise cause from None


def _pipo_cause(ray, exc: BaseException | None) -> PipoError | None:
    """The PipoError behind ``exc``: Ray wraps a worker's exception (``cause``), Ray Data wraps
    that again (``__cause__``); the wrappers also pose as the PipoError but print a traceback."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PipoError) and not isinstance(exc, ray.exceptions.RayError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _report(args, prompts, errors: list[tuple[int, str]]) -> None:
    """One line on stderr when rows got an error field, naming the first by ``file:line``."""
    if not errors:
        return
    index, error = min(errors)
    print(f"pipo: {len(errors)} of {len(prompts)} rows have an \"error\" field instead of a "
          f"completion (first: {args.input}:{prompts[index].line}: {error})", file=sys.stderr)
