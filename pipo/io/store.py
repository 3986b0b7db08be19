"""Offload store: a model converted into one 4 KiB aligned blob per block, streamed with O_DIRECT.

This module is the public face; the format lives in :mod:`pipo.io.store_format`, writing in
:mod:`pipo.io.store_write` and reading in :mod:`pipo.io.store_read`.

- :func:`convert` writes any WeightSource as a store (keep / fp16 / fp32 / int4 weights), atomically.
- :class:`OffloadStore` is the WeightSource over a store: sync ``read_block``, zero-copy async
  ``read_block_into`` a staging buffer, ``verify`` of every checksum.
- :func:`aligned_empty` makes the 4 KiB aligned staging buffers.
"""

from pipo.io.aligned import ALIGN_NBYTES, aligned_empty
from pipo.io.store_format import DATA_NAME, FORMAT_VERSION, INDEX_NAME, StoreIndex
from pipo.io.store_read import OffloadStore, load_index
from pipo.io.store_write import convert

__all__ = [
    "ALIGN_NBYTES",
    "DATA_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "OffloadStore",
    "StoreIndex",
    "aligned_empty",
    "convert",
    "load_index",
]
