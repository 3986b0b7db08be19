"""Toy executors for runtime tests: they move labels instead of tensors and check every slot.

A LoadWeight marks its slot ``("loading", block)`` when it starts and ``block`` when it ends; a
Compute checks, when it starts *and* when it ends, that its weight slot holds its block, that its
micro-batch's activation was left by the previous block, and (decode) that its KV slot holds its
(layer, micro-batch). So a missing dataflow edge (a compute starting before its load ended) or a
missing slot-reuse edge (a refill starting while a compute still reads the slot) fails the run with
an AssertionError, whatever the timing. ``delay_s`` stretches every task so that lanes overlap.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from pipo.io.spec import block_layer
from pipo.runtime import Compute, Executors, LoadKV, LoadWeight, SaveKV, Task


@dataclass
class ToyContext:
    """Slot contents of one toy run, and the order tasks started in."""

    blocks: list[str]
    phase: str
    delay_s: float = 0.0
    w: dict = field(default_factory=dict)
    kv: dict = field(default_factory=dict)
    act: dict = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, name: str) -> None:
        """Log that task ``name`` started; then wait ``delay_s``."""
        with self.lock:
            self.started.append(name)
        if self.delay_s:
            time.sleep(self.delay_s)


def _load_weight(task: LoadWeight, ctx: ToyContext) -> None:
    ctx.w[task.slot] = ("loading", task.block)
    ctx.start(task.name)
    ctx.w[task.slot] = task.block


def _check_compute(task: Compute, ctx: ToyContext, when: str) -> None:
    where = f"{task.name} at {when}"
    if task.slot is not None:
        held = ctx.w.get(task.slot)
        assert held == task.block, f"{where}: weight slot holds {held}"
    index = ctx.blocks.index(task.block)
    if index > 0:
        got = ctx.act.get(task.micro)
        assert got == ctx.blocks[index - 1], f"{where}: activation comes from {got}"
    if task.kv_slot is not None and ctx.phase == "decode":
        want = (block_layer(task.block), task.micro)
        held = ctx.kv.get(task.kv_slot)
        assert held == want, f"{where}: KV slot holds {held}"


def _compute(task: Compute, ctx: ToyContext) -> None:
    _check_compute(task, ctx, "start")
    ctx.start(task.name)
    _check_compute(task, ctx, "end")
    ctx.act[task.micro] = task.block
    if task.kv_slot is not None:
        ctx.kv[task.kv_slot] = (block_layer(task.block), task.micro)


def _load_kv(task: LoadKV, ctx: ToyContext) -> None:
    ctx.kv[task.slot] = ("loading", task.layer, task.micro)
    ctx.start(task.name)
    ctx.kv[task.slot] = (task.layer, task.micro)


def _save_kv(task: SaveKV, ctx: ToyContext) -> None:
    for when in ("start", "end"):
        held = ctx.kv.get(task.slot)
        assert held == (task.layer, task.micro), f"{task.name} at {when}: KV slot holds {held}"
        if when == "start":
            ctx.start(task.name)


def toy_executors(parent: Executors | None = None) -> Executors:
    """A table with the four checking executors (a child of ``parent`` when given)."""
    table = parent.child() if parent is not None else Executors()
    table.register(LoadWeight, _load_weight)
    table.register(Compute, _compute)
    table.register(LoadKV, _load_kv)
    table.register(SaveKV, _save_kv)
    return table


def assert_step_done(ctx: ToyContext, n_micro: int) -> None:
    """Every micro-batch went through every block."""
    assert ctx.act == {m: ctx.blocks[-1] for m in range(n_micro)}


@dataclass(frozen=True, slots=True)
class Step(Task):
    """A synthetic task; its executor does what ``ctx.actions[label]`` says (default: log it)."""

    label: str


def step_table() -> Executors:
    """A table that runs :class:`Step` tasks."""
    table = Executors()
    table.register(Step, lambda task, ctx: ctx.actions.get(task.label, log_step)(task, ctx))
    return table


def log_step(task: Step, ctx) -> None:
    """Append the task's label to ``ctx.ran`` (thread-safe)."""
    with ctx.lock:
        ctx.ran.append(task.label)


def step_ctx(**actions) -> SimpleNamespace:
    """A context for Step tasks: what ran, in order, and an action per label."""
    return SimpleNamespace(ran=[], actions=actions, lock=threading.Lock())


def hanging_step(cancelled: list):
    """An async Step action that waits forever and appends its label to ``cancelled`` when
    cancelled."""

    async def hang(task: Step, ctx) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(task.label)
            raise

    return hang
