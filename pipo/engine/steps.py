"""The step loop's mechanics: a step's inputs in, its logits out, and the next step started early.

Between two decode steps the host reads the logits and samples the next token, but the next step's
leading loads (its first weight loads, disk reads and KV loads: the program's prefix, tasks that no
compute precedes) do not depend on that token. :class:`StepLoop` therefore

1. runs step t (or finishes it, when it was started early) after uploading its token ids,
   positions and key mask;
2. starts copying step t's logits to the host (on CUDA: into pinned memory, non-blocking, with an
   event recorded after the copy);
3. starts step t+1 (``Runtime.start``): its prefix is enqueued on the copy streams (or set going on
   CPU thread lanes) while
4. the host waits for the logits and samples; then step t+1's inputs are uploaded and the run
   finished (back to 1).

So the weight and KV links keep moving data while the host samples. The context fields a prefix task
reads (``start``, ``t``) are set before ``start``; those only compute reads (ids, positions, masks,
attention inputs) after sampling. Tokens are unchanged: the same graph runs on the same inputs.

Device I/O is one of two small objects: :class:`HostIO` on a CPU (tensors stay where they are) and
:class:`CudaIO` on a GPU (uploads from pinned host memory with ``non_blocking=True`` on the current
stream; logits into pinned memory, an event, and the host wait on that event when sampling; one
more host wait when the loop closes, so no copy of the generation is in flight afterwards).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pipo.ops.layers import positions_from_mask
from pipo.runtime.scheduler import Program, RunStats, Runtime, StartedRun


class HostIO:
    """Step inputs and logits on a CPU: nothing to copy and nothing to wait for."""

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` itself (the compute device is the CPU)."""
        return host

    def fetch(self, logits: torch.Tensor) -> Callable[[], torch.Tensor]:
        """A callable returning ``logits`` (already on the host)."""
        return lambda: logits

    def barrier(self) -> None:
        """Nothing to wait for: CPU work is done when its run returned."""


class CudaIO:
    """Step inputs and logits on a GPU, copied without blocking the host.

    ``cuda`` is the CUDA module (default ``torch.cuda``; a fake in tests); ``pinned=False`` skips
    pinning (tests on a CPU build, where pinning raises).
    """

    def __init__(self, device: torch.device, cuda=None, pinned: bool = True):
        self.device, self.pinned = device, pinned
        self.cuda = cuda or torch.cuda

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` on the device: a pinned copy, then a non-blocking copy on the current stream
        (torch's pinned allocator keeps the pinned block until that copy completed)."""
        host = host.contiguous()
        staged = host.pin_memory() if self.pinned else host
        return staged.to(self.device, non_blocking=True)

    def fetch(self, logits: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start copying ``logits`` into pinned host memory; the returned callable waits for the
        copy's event (the host's one wait per step) and returns the host tensor."""
        host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=self.pinned)
        host.copy_(logits, non_blocking=True)
        done = self.cuda.Event()
        done.record(self.cuda.current_stream(self.device))

        def wait() -> torch.Tensor:
            done.synchronize()
            return host

        return wait

    def barrier(self) -> None:
        """Block the host until all work the current stream was ordered after is done (each run
        ends with that stream waiting on its tasks), e.g. before host buffers are unpinned."""
        done = self.cuda.Event()
        done.record(self.cuda.current_stream(self.device))
        done.synchronize()


def step_io(device: torch.device) -> HostIO | CudaIO:
    """The device I/O for ``device``."""
    return CudaIO(device) if device.type == "cuda" else HostIO()


class StepLoop:
    """Runs the steps of one generation on ``runtime``; ``program(phase)`` gives a step's Program.

    Use :meth:`run` for each step, :meth:`start_next` before sampling when another step follows,
    and :meth:`close` at the end (it cancels a started step that will not run: every row ended, or
    an error or interrupt). ``stats`` collects each step's RunStats when ``keep_stats``.
    """

    def __init__(self, runtime: Runtime, io: HostIO | CudaIO, ctx: Any, plan,
                 program: Callable[[str], Program], keep_stats: bool = False):
        self.runtime, self.io, self.ctx, self.plan, self.program = runtime, io, ctx, plan, program
        self.keep_stats = keep_stats
        self.stats: list[RunStats] = []
        self._started: StartedRun | None = None

    def run(self, phase: str, start: int, ids: torch.Tensor, mask: torch.Tensor
            ) -> Callable[[], torch.Tensor]:
        """Run (or finish) the step of ``phase`` at position ``start`` on token ids ``ids``
        [batch, t] and key mask ``mask`` [batch, max_len]; return a wait for its logits [batch,
        vocab] (float32, on the host)."""
        if self._started is None:
            self._set_position(start, ids.shape[1])
        elif (self.ctx.start, self.ctx.t) != (start, ids.shape[1]):
            raise ValueError(f"step at {start} (t={ids.shape[1]}) differs from the started one at "
                             f"{self.ctx.start} (t={self.ctx.t})")
        self._set_inputs(ids, mask)  # should this fail, close() still cancels the started step
        started, self._started = self._started, None
        stats = started.finish() if started else self.runtime.run(self.program(phase), self.ctx)
        if self.keep_stats:
            self.stats.append(stats)
        ctx = self.ctx
        return self.io.fetch(torch.cat([ctx.logits[m] for m in range(self.plan.n_micro)]).float())

    def start_next(self, phase: str, start: int, t: int) -> None:
        """Start the next step's prefix (it reads only ``start`` and ``t``)."""
        self._set_position(start, t)
        self._started = self.runtime.start(self.program(phase), self.ctx)

    def close(self) -> None:
        """Cancel a started step that will not be finished, then wait until the device finished
        every copy of this generation (a cancelled step's loads too): the caller may free or unpin
        the host buffers they read next."""
        started, self._started = self._started, None
        if started is not None:
            started.cancel()
        self.io.barrier()

    def _set_position(self, start: int, t: int) -> None:
        self.ctx.start, self.ctx.t = start, t

    def _set_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Upload ids, positions and mask once each; micro-batches are row views of them."""
        ctx, io = self.ctx, self.io
        positions = positions_from_mask(mask[:, :ctx.start + ctx.t])[:, ctx.start:]
        ids_d, positions_d, mask_d = io.upload(ids), io.upload(positions), io.upload(mask)
        rows = [slice(m * self.plan.micro_batch, (m + 1) * self.plan.micro_batch)
                for m in range(self.plan.n_micro)]
        ctx.ids = [ids_d[r] for r in rows]
        ctx.positions = [positions_d[r] for r in rows]
        ctx.key_mask = [mask_d[r] for r in rows]
        ctx.attn_inputs = {}
