"""Page-aligned host buffers for direct (``O_DIRECT``) disk reads.

``O_DIRECT`` reads need the destination address, the file offset and the length to be multiples of
the device's logical block size; :data:`ALIGN_NBYTES` (4 KiB) covers every disk we meet. ``torch.empty``
only guarantees 64-byte alignment, so :func:`aligned_empty` over-allocates by one page and returns the
aligned slice: a view whose storage (the owner) stays alive as long as the view or any view of it does.
"""

from __future__ import annotations

import torch

ALIGN_NBYTES = 4096


def align_up(nbytes: int, align_nbytes: int = ALIGN_NBYTES) -> int:
    """Smallest multiple of ``align_nbytes`` that is ``>= nbytes``."""
    return -(-nbytes // align_nbytes) * align_nbytes


def is_aligned(buffer: torch.Tensor, align_nbytes: int = ALIGN_NBYTES) -> bool:
    """Whether the first byte of ``buffer`` sits at a multiple of ``align_nbytes``."""
    return buffer.data_ptr() % align_nbytes == 0


def aligned_empty(nbytes: int) -> torch.Tensor:
    """Uninitialised uint8 CPU tensor of ``nbytes`` bytes whose data starts on a 4 KiB boundary.

    Pageable. Pinned staging buffers come from the engine's host arena instead
    (:class:`pipo.runtime.memory.HostArena`, 4 KiB aligned views of one page-locked region), never
    from torch's pinned allocator, which would round each buffer up to a power of two.
    """
    if nbytes < 0:
        raise ValueError(f"aligned_empty needs nbytes >= 0, got {nbytes}")
    owner = torch.empty(nbytes + ALIGN_NBYTES, dtype=torch.uint8)
    skip_nbytes = (-owner.data_ptr()) % ALIGN_NBYTES
    return owner[skip_nbytes : skip_nbytes + nbytes]
