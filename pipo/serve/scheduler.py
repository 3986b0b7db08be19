"""Continuous batching: requests join and leave one running batch of row slots at step boundaries.

Policy (iteration-level scheduling, as in Orca and vLLM): one thread owns the batch and loops
``admit -> compose -> step -> sample -> retire``.

* **admit**: queued requests take free row slots (``batch.admit``), oldest first, up to
  ``max_batch`` rows; a request waits in the queue (at most ``max_queue``) until a slot is free.
* **compose**: every active row contributes its tokens to ONE ``batch.step``: a row still reading
  its prompt gives its next chunk of at most ``prefill_chunk`` tokens, a decoding row its last
  sampled token. New prompts and other rows' decode tokens so share one weight pass.
* **sample**: a row whose prompt is fully read samples its next token from its own logits with its
  own :class:`~pipo.ops.sampling.SamplingParams` and generator (per-row temperature/top_p/seed).
* **retire**: a row that hit end-of-text, ``max_tokens`` or was cancelled is freed at once
  (``batch.free``); its slot is free for the next admit. A cancel is seen at the next step
  boundary, so a cancelled row takes part in at most one more step.

Faults: an exception from ``batch.step`` fails exactly the rows of that step (each gets an error
event and its slot is freed); the loop goes on with the next request.

State: ``_queue`` (waiting requests), ``_active`` (row -> request), both guarded by ``_lock``;
``Request.fed`` tokens of the request are in its row's KV. Events reach the request's owner through
``Request.on_event(kind, value)`` from the scheduler thread: ``("token", id)``,
``("done", "stop" | "length" | "cancelled")``, ``("error", message)``; exactly one of done/error
ends a request.

The batch object follows the per-row KV contract (``admit / step / length / free / close``).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipo.errors import PipoError
from pipo.ops.sampling import SamplingParams, make_generator, sample


class QueueFull(PipoError):
    """The request queue is at ``max_queue``: the server answers 429."""


class NotAccepting(PipoError):
    """The scheduler is shutting down and takes no new requests."""


@dataclass(eq=False)
class Request:
    """One generation request: prompt token ids, limits, sampling and an event callback."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    on_event: Callable[[str, object], None] = lambda kind, value: None
    id: int = field(default_factory=itertools.count().__next__)
    generated: list[int] = field(default_factory=list)
    fed: int = 0
    row: object = None
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator | None = None

    def pending(self) -> list[int]:
        """The tokens this request feeds into the next step (prompt chunk or last token)."""
        if self.fed < len(self.prompt):
            return self.prompt[self.fed:]
        return self.generated[-1:]


@dataclass
class SchedulerStats:
    """Counters since start: steps run, requests finished, failed, cancelled; the most rows one
    step ran and the rows of all steps together (their mean is ``row_steps / steps``)."""

    steps: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    peak_rows: int = 0
    row_steps: int = 0


class Scheduler:
    """Runs a batch of row slots for many concurrent requests (see the module docstring)."""

    def __init__(self, batch, *, max_batch: int, max_queue: int, prefill_chunk: int,
                 eos_ids: tuple[int, ...] = (), overlap: bool = True):
        if min(max_batch, max_queue, prefill_chunk) < 1:
            raise ValueError("max_batch, max_queue and prefill_chunk must be at least 1")
        self.batch = batch
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.eos = set(eos_ids)
        self.stats = SchedulerStats()
        self.overlap = overlap
        self._queue: deque[Request] = deque()
        self._active: dict[object, Request] = {}
        self._lock = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- called from any thread ------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue ``request``; :class:`QueueFull` or :class:`NotAccepting` when it cannot wait."""
        with self._lock:
            if not self._accepting:
                raise NotAccepting("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            sampling = request.sampling
            request.generator = None if sampling.greedy else make_generator(sampling)
            self._queue.append(request)
            self._lock.notify_all()

    def cancel(self, request: Request) -> None:
        """Stop ``request``: it leaves the queue, or its row is freed, at the next step boundary."""
        with self._lock:
            request.cancelled = True
            self._lock.notify_all()

    def load(self) -> dict[str, int]:
        """Rows running and requests waiting now."""
        with self._lock:
            return {"running": len(self._active), "queued": len(self._queue)}

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._loop, name="pipo-scheduler", daemon=True)
        self._thread.start()

    def stop(self, cancel: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; cancel (or, ``cancel=False``, finish) every request; join."""
        with self._lock:
            self._accepting = False
            if cancel:
                for request in (*self._queue, *self._active.values()):
                    request.cancelled = True
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the scheduler thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._active and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._queue and not self._active:
                    break
            try:
                self.step_once()
            except Exception as exc:  # noqa: BLE001 - a bug fails the running rows, not the server
                self._fail_active(exc)
        self.batch.close()  # in the thread that ran it: cancels a prefetched pass

    def step_once(self) -> int:
        """One step boundary and step: retire cancelled rows, admit, run; returns rows stepped."""
        with self._lock:
            self._retire_cancelled()
            self._admit()
            work = dict(self._active)
        if work:
            self.run_step(work)
        return len(work)

    def _retire_cancelled(self) -> None:
        for request in [r for r in self._queue if r.cancelled]:
            self._queue.remove(request)
            self._end(request, "done", "cancelled")
        for row, request in list(self._active.items()):
            if request.cancelled:
                self._release(row)
                self._end(request, "done", "cancelled")

    def _admit(self) -> None:
        while self._queue and len(self._active) < self.max_batch:
            request = self._queue[0]
            try:
                row = self.batch.admit()  # the prompt goes in through step, chunk by chunk
            except Exception as exc:  # noqa: BLE001 - BatchFull or a refused prompt fails this request only
                self._queue.popleft()
                self._end(request, "error", f"could not admit the request: {exc}")
                continue
            self._queue.popleft()
            request.row = row
            request.fed = self.batch.length(row)
            self._active[row] = request

    def run_step(self, work: dict[object, Request]) -> None:
        """One step: each row of ``work`` feeds its pending tokens; sample and retire after."""
        feed = {row: r.pending()[:self.prefill_chunk] for row, r in work.items()}
        self.stats.steps += 1
        self.stats.peak_rows = max(self.stats.peak_rows, len(feed))
        self.stats.row_steps += len(feed)
        try:
            logits = self._pass(feed, work)
        except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, not the server
            self._fail_active(exc)
            return
        with self._lock:
            for row, request in work.items():
                request.fed += len(feed[row])
                if request.fed >= len(request.prompt):
                    self._take_token(row, request, logits[row][-1:])

    def _pass(self, feed: dict, work: dict[object, Request]) -> dict:
        """The weight pass of ``feed``; where the batch can, the next step's leading loads start
        while this one's logits are awaited (a guess: the same rows go on; a wrong guess only
        costs the batch a restart)."""
        if not self.overlap or not hasattr(self.batch, "submit"):
            return self.batch.step(feed, logits="last")
        wait = self.batch.submit(feed, logits="last")
        following = self._following(feed, work)
        if following:
            self.batch.prefetch(following)
        return wait()

    def _following(self, feed: dict, work: dict[object, Request]) -> dict:
        """Tokens per row of the next step if no row ends early and none joins; {} if some will."""
        with self._lock:
            if self._queue and len(self._active) < self.max_batch:
                return {}  # a request joins at the next boundary
        following = {}
        for row, request in work.items():
            fed = request.fed + len(feed[row])
            if fed < len(request.prompt):
                following[row] = min(self.prefill_chunk, len(request.prompt) - fed)
            elif len(request.generated) + 1 < request.max_tokens and not request.cancelled:
                following[row] = 1
        return following

    def _fail_active(self, exc: Exception) -> None:
        with self._lock:
            for row, request in list(self._active.items()):
                self._release(row)
                self._end(request, "error", f"the step failed: {type(exc).__name__}: {exc}")

    def _take_token(self, row, request: Request, logits: torch.Tensor) -> None:
        if request.cancelled:
            return  # retired at the next boundary, its token dropped
        token = int(sample(logits, request.sampling, request.generator)[0])
        if token in self.eos:
            self._release(row)
            self._end(request, "done", "stop")
            return
        request.generated.append(token)
        request.on_event("token", token)
        if len(request.generated) >= request.max_tokens:
            self._release(row)
            self._end(request, "done", "length")

    def _release(self, row) -> None:
        self._active.pop(row, None)
        try:
            self.batch.free(row)
        except Exception:  # noqa: BLE001, S110 - a failed free must not stop the other rows
            pass

    def _end(self, request: Request, kind: str, value: object) -> None:
        if request.finished:
            return
        request.finished = True
        if kind == "error":
            self.stats.failed += 1
        elif value == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        request.on_event(kind, value)
