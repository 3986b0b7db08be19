"""Lanes: where tasks run. One lane per kind of activity, so different activities overlap.

A lane receives a zero-argument ``work`` callable (an executor bound to its task and context) and
the *markers* of the task's predecessors, runs the work, and returns the task's own marker.

Run boundaries (all optional, default no-ops): before a run's first task the runtime calls
:meth:`Lane.begin_run` on every lane the run uses; the marker it returns is added to the ``after``
of the run's root tasks on that lane. A run started with ``Runtime.start`` and completed later calls
:meth:`Lane.resume_run` when the caller hands it back; that marker is added to the ``after`` of the
tasks released then whose predecessors all ran before. When the run ends, :meth:`Lane.end_run`
receives the markers of the lane's tasks that no other task of the run waited on. CPU lanes need
none of this (a task's work is done when ``run`` returns); CUDA lanes use it to order a step
against the caller's stream once per run instead of once per task.

- On a CPU every marker is ``None``: a predecessor's work is finished when its ``run`` returned.
- A CUDA lane (``pipo.runtime.cuda_lanes``) enqueues work on its stream after ``wait_event`` on the
  predecessors' events and returns an event; the host never blocks on GPU→GPU dependencies.

Two CPU lane kinds:
- :class:`ThreadLane`: one long-lived worker thread fed from a queue (no thread hop per task; torch
  releases the GIL in copies and matmuls, so a ThreadLane copy overlaps compute on another lane).
- :class:`LoopLane`: runs work on the event-loop thread and awaits it if it returns an awaitable.
  Used for async I/O (aiofiles) and, on CPU, for compute: a thread round trip costs ~100 µs on
  small VMs, which is more than many small blocks take to compute.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

Work = Callable[[], Any]


@dataclass
class RunInfo:
    """What lanes learn about the run they take part in: its id (unique per process) and a dict
    through which the lanes of one run may share per-run objects (e.g. one CUDA event per device)."""

    id: int
    shared: dict = field(default_factory=dict)


class Lane(ABC):
    """A place where tasks run one after another, concurrently with other lanes."""

    def __init__(self, name: str):
        self.name = name

    @abstractmethod
    async def run(self, work: Work, after: Sequence[Any] = ()) -> Any:
        """Run ``work`` once the predecessors' ``after`` markers allow; return this task's marker."""

    def begin_run(self, run: RunInfo) -> Any:
        """A run that uses this lane starts; return the marker its root tasks here wait on."""
        return None

    def resume_run(self, run: RunInfo) -> Any:
        """A started run is handed back by its caller; return the marker that tasks released now,
        whose predecessors all ran before, wait on (they may read what the caller just wrote)."""
        return None

    def end_run(self, run: RunInfo, markers: Sequence[Any]) -> None:
        """The run ended; ``markers`` are this lane's tasks that nothing else in the run waited on
        (on a failure or cancel: every task that finished here). Later work must follow them."""

    def close(self) -> None:
        """Release the lane's resources (threads, streams). Idempotent."""


class LoopLane(Lane):
    """Runs work on the event-loop thread; awaits it when it returns an awaitable."""

    async def run(self, work: Work, after: Sequence[Any] = ()) -> None:
        """Run ``work`` now on the loop thread; await its result if it is awaitable."""
        result = work()
        if result is not None and inspect.isawaitable(result):
            await result
        return None


class ThreadLane(Lane):
    """Runs work on one dedicated worker thread, in submission order."""

    def __init__(self, name: str):
        super().__init__(name)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"pipo-lane-{name}", daemon=True)
        self._thread.start()

    async def run(self, work: Work, after: Sequence[Any] = ()) -> None:
        """Queue ``work`` for the lane's thread and wait for it; awaitables are rejected."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((work, future, loop))
        return await future

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            work, future, loop = item
            try:
                result = work()
                if inspect.isawaitable(result):
                    if inspect.iscoroutine(result):
                        result.close()  # never awaited: close it, or Python warns at exit
                    raise TypeError(f"lane {self.name} runs only synchronous executors")
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, future, exc, None)
            else:
                loop.call_soon_threadsafe(_settle, future, None, None)

    def close(self) -> None:
        """Let the thread finish its queue, then stop it."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _settle(future: asyncio.Future, exc: BaseException | None, result: Any) -> None:
    if future.done():  # cancelled while the thread worked
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def cpu_lane(name: str) -> Lane:
    """The default CPU lane for a lane name: compute and disk on the loop, copies on threads."""
    from pipo.runtime.tasks import COMPUTE, DISK

    return LoopLane(name) if name in (COMPUTE, DISK) else ThreadLane(name)
