"""The engine: plans a run, places weights and KV, compiles step graphs once, generates tokens.

``Engine.open_batch`` gives per-row KV batches (:mod:`pipo.engine.batch`); ``Engine.generate_ids``
is a thin user of one: the prompts are the first step's rows, then one decode token per row and
step (:func:`pipo.engine.loop.decode_loop`); sampling happens between runs on the host, while the
next step's leading loads already run (:mod:`pipo.engine.steps`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from graphs import build_step
from pipo.engine import executors as _executors  # noqa: F401 - registers the default executors
from pipo.engine.batch import Batch
from pipo.engine.context import StepContext
from pipo.engine.kv import KVCache
from pipo.engine.loop import Generation, decode_loop
from pipo.engine.options import EngineOptions
from pipo.engine.steps import step_io
from pipo.engine.weights import PlacedWeights, placed_sizes, store_is_int4
from pipo.errors import GenerationError, PlanError
from pipo.ops.rope import rope_tables
from pipo.ops.sampling import SamplingParams
from pipo.ops.traits import traits_for
from pipo.plan import DISK, Plan, fixed_plan, make_plan
from pipo.runtime.scheduler import Program, Runtime


class Engine:
    """Generates text from one model. Owns the runtime (lanes, event loop); close it when done.

    ``runtime`` runs the step graphs; ``step_io`` moves each step's inputs and logits between host
    and device (:mod:`pipo.engine.steps`).
    """

    def __init__(self, source, options: EngineOptions | None = None):
        self.source = source
        self.options = (options or EngineOptions()).for_source(source)
        self.spec = source.spec
        self.tokenizer = source.tokenizer
        self.device = self.options.torch_device()
        self.dtype = self.options.torch_dtype()
        self.runtime = Runtime(lane_factory=self.options.lane_factory(), trace=self.options.trace)
        self.step_io = step_io(self.device)
        self._weights: PlacedWeights | None = None
        self._kv: KVCache | None = None
        self._programs: dict[tuple, Program] = {}
        self._planned_for: dict[tuple, object] = {}  # (batch, max_len, options) -> planner choice

    def plan_for(self, batch: int, max_len: int) -> Plan:
        """The plan for a batch of ``batch`` sequences of up to ``max_len`` tokens."""
        o = self.options
        tier = o.offload_tier(self.source)
        if o.placement == DISK and tier != DISK:
            raise PlanError("--placement disk needs an offload store: convert the model first "
                            "with `pipo convert MODEL STORE` and pass --model STORE")
        if o.int4_group() and tier == DISK and not store_is_int4(self.source):
            raise PlanError("--weights int4 with a dense offload store would stream dense blocks: "
                            "convert the store with `pipo convert ... --weights int4`")
        if o.device_memory is not None or o.host_memory is not None:
            return self._planned(batch, max_len)
        sizes = placed_sizes(self.source, self.device, self.dtype, o.int4_group())
        schedule = o.schedule or "pipo"
        # flexgen keeps three KV slots busy per step (save m-1, compute m, load m+1)
        n_kv_slots = o.n_kv_slots or (3 if schedule == "flexgen" else 2)
        micro_batch = min(o.micro_batch, batch) if o.micro_batch else None
        common = dict(batch=batch, max_len=max_len, micro_batch=micro_batch,
                      kv_offload=o.kv_offload or o.kv_disk_dir is not None,
                      n_weight_slots=o.n_weight_slots or 2, n_kv_slots=n_kv_slots,
                      kv_dtype_nbytes=self.dtype.itemsize, schedule=schedule)
        if o.placement != "auto":
            plan = fixed_plan(self.spec, sizes, o.placement, **common)
        else:
            plan = make_plan(self.spec, sizes, offload_tier=tier, **common)
        return replace(plan, staged_disk=o.stage_disk_reads(), kv_disk=o.kv_disk_dir is not None)

    def _planned(self, batch: int, max_len: int) -> Plan:
        """The planner's plan under the memory caps (:mod:`pipo.planner`); int4 weights when it
        chose them (only with ``allow_int4``)."""
        from pipo.planner.engine_plan import plan_engine

        key = (batch, max_len, self.options)
        if key not in self._planned_for:  # a JSONL job asks for the same shapes again and again
            self._planned_for[key] = plan_engine(self, batch, max_len).best
        best = self._planned_for[key]
        if best.int4 and self.options.weights != "int4":
            self.options = replace(self.options, weights="int4")
        return replace(best.plan, staged_disk=self.options.stage_disk_reads())

    def open_batch(self, rows: int, max_len: int) -> Batch:
        """A :class:`~pipo.engine.batch.Batch` of ``rows`` row slots of up to ``max_len`` tokens
        each (one KV cache; its previous batch's cache is released). See docs/rows.md."""
        if rows < 1 or max_len < 1:
            raise GenerationError(f"a batch needs rows >= 1 and max_len >= 1, got {rows}, {max_len}")
        plan = self.plan_for(rows, max_len)
        return Batch(self.runtime, self.step_io, self._context(plan), plan, max_len,
                     lambda phase: self.program(plan, phase), keep_stats=self.options.trace)

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int,
                     sampling: SamplingParams = SamplingParams(), *, keep_logits: bool = False,
                     on_step: Callable[[list[int | None]], None] | None = None) -> Generation:
        """Generate up to ``max_new_tokens`` tokens after each prompt (one row of a batch each).

        ``on_step`` receives, after every step, each row's new token (``None`` once a row ended).
        """
        sampling.validate()
        self._check_request(prompts, max_new_tokens)
        batch = self.open_batch(len(prompts), max(len(p) for p in prompts) + max_new_tokens)
        try:
            return decode_loop(batch, prompts, max_new_tokens, sampling, set(self.spec.eos_ids),
                               keep_logits=keep_logits, on_step=on_step)
        finally:
            batch.close()

    def _check_request(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GenerationError("every prompt must have at least one token")
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        need = max(len(p) for p in prompts) + max_new_tokens
        window = self.spec.sliding_window
        if window and need > window:
            raise GenerationError(
                f"prompt plus max_new_tokens ({need} tokens) exceeds the model's sliding attention "
                f"window of {window} tokens, which pipo does not implement yet")
        if need > self.spec.max_positions:
            raise GenerationError(
                f"prompt ({max(len(p) for p in prompts)} tokens) plus max_new_tokens "
                f"({max_new_tokens}) exceeds the model's context of {self.spec.max_positions} tokens")

    def _pad_id(self) -> int:
        spec = self.spec
        return next(i for i in (spec.pad_id, *spec.eos_ids, 0) if i is not None)

    def _context(self, plan: Plan) -> StepContext:
        if (self._weights is None or _weights_key(self._weights.plan) != _weights_key(plan)
                or self._weights.int4_group != self.options.int4_group()):  # the planner chose int4
            _close(self._weights)  # release the old placement (and its pinned arena) first
            self._weights = None
            self._weights = PlacedWeights(self.source, plan, device=self.device, dtype=self.dtype,
                                          int4_group=self.options.int4_group())
        else:
            self._weights.plan = plan
        rope = None
        if traits_for(self.spec).positions == "rope":
            rope = rope_tables(self.spec, plan.max_len, self.device, self.dtype)
        _close(self._kv)  # the previous generation's cache (and its pinned arena)
        self._kv = kv = KVCache(self.spec, plan, device=self.device, dtype=self.dtype,
                                disk_dir=self.options.kv_disk_dir or _scratch_dir(plan))
        return StepContext(self.spec, self._weights, kv, rope)

    def program(self, plan: Plan, phase: str) -> Program:
        """The compiled step graph of ``phase`` for ``plan`` (compiled once, then reused)."""
        key = (graph_key(plan), phase)
        if key not in self._programs:
            self._programs[key] = self.runtime.compile(build_step(self.spec, plan, phase))
        return self._programs[key]

    def generate(self, prompts: str | list[str], max_new_tokens: int = 64,
                 sampling: SamplingParams = SamplingParams(), *, chat: bool = False,
                 system: str | None = None, on_text=None) -> str | list[str]:
        """Completion text of one prompt (a ``str``) or of each prompt of a list (a batch).

        ``chat`` wraps prompts in the model's chat template; ``on_text(row, piece)`` streams.
        """
        from pipo.engine.text import complete

        return complete(self, prompts, max_new_tokens, sampling, chat=chat, system=system,
                        on_text=on_text)

    def close(self) -> None:
        """Stop the runtime's lanes and release weights and KV cache (unpinning their host memory)."""
        self.runtime.close()
        _close(self._weights)
        _close(self._kv)
        self._weights = self._kv = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close(owner) -> None:
    if owner is not None:
        owner.close()


def _scratch_dir(plan: Plan) -> str | None:
    """Where a disk KV cache the planner chose lives when no --kv-disk DIR was given."""
    import tempfile

    return tempfile.gettempdir() if plan.kv_disk else None


def graph_key(plan: Plan) -> Plan:
    """What a step graph depends on: every plan field except these sizes and the KV's store."""
    return replace(plan, max_len=0, slot_nbytes=0, kv_nbytes=0, resident_nbytes=0, kv_disk=False)


def _weights_key(plan: Plan) -> tuple:
    """What PlacedWeights depends on: reuse them across calls while it is unchanged."""
    return plan.placement, plan.n_weight_slots, plan.staged_disk
