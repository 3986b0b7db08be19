"""Host memory arenas: a few large page-locked mappings carved into views, released as a whole.

Why: torch's pinned (caching host) allocator rounds every allocation up to a power of two, so pinning
each weight block or KV tensor on its own holds up to twice the data (a 129 MiB tensor holds 256 MiB),
through one slow ``cudaHostAlloc`` per tensor. A :class:`HostArena` maps anonymous memory instead
(reserved, not committed: a page costs RAM only once written), carves aligned ``uint8`` views out of
it and page-locks the part in use with one registration per mapping (:meth:`HostArena.pin`). Pinned
bytes are then the used bytes rounded up to a page.

Lifetime: a view keeps its mapping alive (``torch.frombuffer`` holds a reference), so memory is never
freed under a view. :meth:`HostArena.close` (or the arena being garbage collected) unregisters the
ranges; a view that outlives it is plain pageable memory, still valid.

Pinning is a :class:`PinRegistrar`: :func:`default_registrar` gives ``cudaHostRegister`` on a CUDA
device and ``None`` (nothing pinned) elsewhere; tests pass a fake that records the ranges.
"""

from __future__ import annotations

import mmap
import sys
import weakref
from typing import Protocol

import torch

PAGE_NBYTES = 4096
# Reserve address space without committing it (Linux's value; Python names it only from 3.12 on)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
MIN_GROW_NBYTES = 64 << 20  # smallest extra mapping when a reservation turns out too small
_LIVE: weakref.WeakSet[HostArena] = weakref.WeakSet()  # for arena_stats


class PinRegistrar(Protocol):
    """Page-locks host address ranges (``cudaHostRegister`` on a GPU)."""

    def register(self, ptr: int, nbytes: int) -> None:
        """Page-lock ``nbytes`` bytes at address ``ptr``."""

    def unregister(self, ptr: int) -> None:
        """Release the range registered at ``ptr`` (no copy may still use it)."""


class CudaHostRegistrar:
    """``cudaHostRegister`` with the portable flag (pinned for every device's context, as torch's own
    ``_pin_memory_utils`` does); unregistering first waits for ``device``, so no copy still uses it."""

    PORTABLE = 1  # cudaHostRegisterPortable

    def __init__(self, device: torch.device):
        self.device = device

    def register(self, ptr: int, nbytes: int) -> None:
        """Page-lock the range; raises ``RuntimeError`` with the CUDA error code on failure."""
        code = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, self.PORTABLE))
        if code != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with cudaError {code}")

    def unregister(self, ptr: int) -> None:
        """Wait for the device (teardown only), then unregister the range."""
        torch.cuda.synchronize(self.device)
        code = int(torch.cuda.cudart().cudaHostUnregister(ptr))
        if code != 0:
            raise RuntimeError(f"cudaHostUnregister failed with cudaError {code}")


def default_registrar(device: torch.device) -> PinRegistrar | None:
    """How host arenas feeding ``device`` are page-locked: cudaHostRegister on CUDA, not at all else."""
    return CudaHostRegistrar(device) if device.type == "cuda" else None


def align_up(nbytes: int, align_nbytes: int) -> int:
    """Smallest multiple of ``align_nbytes`` that is ``>= nbytes``."""
    return -(-nbytes // align_nbytes) * align_nbytes


class _Mapping:
    """One anonymous private mapping, its uint8 tensor view and how much of it is carved."""

    def __init__(self, capacity_nbytes: int):
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        self.buffer = torch.frombuffer(mmap.mmap(-1, capacity_nbytes, flags=flags), dtype=torch.uint8)
        self.ptr = self.buffer.data_ptr()  # page-aligned: mmap returns whole pages
        self.capacity_nbytes = capacity_nbytes
        self.used_nbytes = 0


class HostArena:
    """Host memory for one kind of buffer (weights, KV cache), carved into aligned views.

    ``reserve_nbytes`` is an upper bound of what will be taken (reserved address space, committed
    only as written); taking more maps another region. Take every view, then :meth:`pin` once.
    """

    def __init__(self, reserve_nbytes: int, registrar: PinRegistrar | None = None, name: str = "host"):
        self.name = name
        self.registrar = registrar
        self.reserve_nbytes = max(reserve_nbytes, PAGE_NBYTES)
        self.logical_nbytes = 0
        self.pinned_nbytes = 0
        self._sealed = False  # pin() or close() was called: no more views
        self._mappings: list[_Mapping] = []
        self._registered: list[int] = []  # addresses to unregister; shared with the finalizer
        self._finalizer = weakref.finalize(self, _unregister_all, registrar, self._registered)
        _LIVE.add(self)

    def take(self, nbytes: int, align_nbytes: int = 256) -> torch.Tensor:
        """A new ``uint8`` view of ``nbytes`` bytes whose first byte is ``align_nbytes``-aligned."""
        if self._sealed:
            raise RuntimeError(f"{self.name} arena: take() after pin() or close()")
        mapping = self._mappings[-1] if self._mappings else None
        start = align_up(mapping.used_nbytes, align_nbytes) if mapping else 0
        if mapping is None or start + nbytes > mapping.capacity_nbytes:
            # the reservation first; past it, extra mappings (their unwritten tails cost no RAM)
            capacity = max(nbytes, MIN_GROW_NBYTES if self._mappings else self.reserve_nbytes)
            mapping, start = _Mapping(align_up(capacity, PAGE_NBYTES)), 0
            self._mappings.append(mapping)
        mapping.used_nbytes = start + nbytes
        self.logical_nbytes += nbytes
        return mapping.buffer[start:start + nbytes]

    def pin(self) -> None:
        """Page-lock the used part of every mapping (one registration each); no-op without a
        registrar. Call after the last :meth:`take` (later calls do nothing)."""
        if self._sealed:
            return
        self._sealed = True
        if self.registrar is None:
            return
        for mapping in self._mappings:
            if mapping.used_nbytes:
                nbytes = align_up(mapping.used_nbytes, PAGE_NBYTES)
                self.registrar.register(mapping.ptr, nbytes)
                self._registered.append(mapping.ptr)
                self.pinned_nbytes += nbytes

    @property
    def mapped_nbytes(self) -> int:
        """Address space reserved (RAM is committed only for what was written)."""
        return sum(m.capacity_nbytes for m in self._mappings)

    def close(self) -> None:
        """Unregister every pinned range and drop this arena's hold on its mappings."""
        self._sealed = True
        self._finalizer()
        self._mappings.clear()
        self.pinned_nbytes = 0


def arena_stats() -> dict[str, int]:
    """Over every live arena of this process: bytes handed out as views (``data_nbytes``) and bytes
    page-locked (``pinned_nbytes``); benchmarks report both."""
    arenas = list(_LIVE)
    return {"data_nbytes": sum(a.logical_nbytes for a in arenas if a.pinned_nbytes or a.mapped_nbytes),
            "pinned_nbytes": sum(a.pinned_nbytes for a in arenas)}


def _unregister_all(registrar: PinRegistrar | None, addresses: list[int]) -> None:
    while addresses:
        registrar.unregister(addresses.pop())
