"""The step loop's mechanics: a step's inputs in, its logits out, and the next step started early.

Between two decode steps the host reads the logits and samples the next token, but the next step's
leading loads (its first weight loads, disk reads and KV loads: the program's prefix, tasks that no
compute precedes) do not depend on that token. A :class:`~pipo.engine.batch.Batch` therefore

1. runs step t (or finishes it, when it was started early) after uploading its packed token ids
   and row layouts (``Batch.submit``);
2. starts copying step t's logits to the host (on CUDA: into pinned memory, non-blocking, with an
   event recorded after the copy);
3. starts step t+1 (``Batch.prefetch`` -> ``Runtime.start``): its prefix is enqueued on the copy
   streams (or set going on CPU thread lanes) while
4. the host waits for the logits and samples; then step t+1's inputs are uploaded and the run
   finished (back to 1).

So the weight and KV links keep moving data while the host samples. The context field a prefix task
reads (``kv_load_end``) is set before the start; those only compute reads (ids, row layouts,
attention inputs, save ranges) after sampling. Tokens are unchanged: the same graph runs on the
same inputs.

Device I/O is one of two small objects: :class:`HostIO` on a CPU (tensors stay where they are) and
:class:`CudaIO` on a GPU (uploads from pinned host memory with ``non_blocking=True`` on the current
stream; logits into pinned memory, an event, and the host wait on that event when sampling; one
more host wait when the loop closes, so no copy of the generation is in flight afterwards).
"""

from __future__ import annotations

from typing import Callable

import torch



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
