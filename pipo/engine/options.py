"""What a user chooses when loading a model: one frozen record, validated in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch

from pipo.errors import PipoError
from pipo.ops.quant import INT4_GROUP_SIZES
from pipo.plan import DISK, HOST, PLACEMENTS, SCHEDULE_NAMES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_MODES = ("auto", "int4")


@dataclass(frozen=True)
class EngineOptions:
    """Device, dtypes, memory budget and schedule settings of an :class:`Engine`.

    ``weights="int4"`` keeps 4-bit checkpoints 4-bit and quantizes dense ones (group ``group_size``);
    ``"auto"`` computes on dense weights in ``dtype`` (4-bit GGUF blocks are dequantized at
    placement), except on an offload store holding int4 weights: a store's own format is its default
    (:meth:`for_source`). ``device_memory`` (bytes) caps resident weights + weight slots + device
    KV; ``None`` keeps everything resident. ``placement`` other than ``"auto"`` puts every block in
    one tier (``resident``, ``host``, ``disk``), like FlexGen's fixed ``--percent``. ``staged_disk``
    reads disk blocks into host staging buffers before copying them to a slot (default: on CUDA
    only; on CPU the disk lane reads straight into the slot).
    ``kv_disk_dir`` keeps the offloaded KV cache in a scratch file in that directory (implies
    ``kv_offload``).

    With ``device_memory`` or ``host_memory`` (bytes) set, the planner (:mod:`pipo.planner`)
    chooses what is left unset: placement, KV place, micro-batch, slots, schedule, and int4 weights
    when ``allow_int4``. ``None`` for ``schedule`` / ``n_weight_slots`` means "not chosen by hand"
    (``pipo`` and 2 without a planner). ``link_gbps`` throttles every host<->device copy lane to that
    many GB/s (10**9 bytes/s), to emulate a slower link.
    """

    device: str = "cpu"
    dtype: str | None = None
    weights: str = "auto"
    group_size: int = 64
    device_memory: int | None = None
    placement: str = "auto"
    kv_offload: bool = False
    schedule: str | None = None
    micro_batch: int | None = None
    n_weight_slots: int | None = None
    n_kv_slots: int | None = None
    staged_disk: bool | None = None
    kv_disk_dir: str | None = None
    trace: bool = False
    host_memory: int | None = None
    allow_int4: bool = False
    link_gbps: float | None = None

    def __post_init__(self):
        if self.weights not in WEIGHT_MODES:
            raise PipoError(f"unknown --weights {self.weights!r}; choose one of "
                            f"{', '.join(WEIGHT_MODES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise PipoError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.schedule is not None and self.schedule not in SCHEDULE_NAMES:
            raise PipoError(f"unknown --schedule {self.schedule!r}; choose one of "
                            f"{', '.join(SCHEDULE_NAMES)}")
        if self.placement not in ("auto", *PLACEMENTS):
            raise PipoError(f"unknown placement {self.placement!r}; choose auto or one of "
                            f"{', '.join(PLACEMENTS)}")
        if self.kv_disk_dir is not None and not os.path.isdir(self.kv_disk_dir):
            raise PipoError(f"--kv-disk {self.kv_disk_dir}: no such directory")
        if self.link_gbps is not None and not self.link_gbps > 0:
            raise PipoError(f"--link-gbps must be a positive number of GB/s, got {self.link_gbps}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise PipoError(f"--group-size must be 32, 64 or 128, got {self.group_size}")

    def torch_device(self) -> torch.device:
        """The compute device; a clear error when CUDA is asked for but absent."""
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise PipoError(f"unsupported device {self.device!r}; use cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise PipoError(f"unsupported device {self.device!r}; use cpu, cuda or cuda:N")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise PipoError("--device cuda was asked for but no CUDA device is available "
                            "(this torch build or machine has none); use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise PipoError(f"--device {self.device}: this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
        if device.type == "cuda" and self.kv_disk_dir is not None:
            raise PipoError("--kv-disk is CPU-only for now: a memory-mapped cache is pageable "
                            "memory, which would stall the CUDA copy lanes; use --kv-offload")
        return device

    def torch_dtype(self) -> torch.dtype:
        """Compute dtype: as asked, else float16 on CUDA, bfloat16 for int4 weights on the CPU (what
        torch's CPU int4 kernel computes in; the residual stream stays fp32) and float32 otherwise."""
        if self.dtype is not None:
            return DTYPES[self.dtype]
        if self.torch_device().type == "cuda":
            return torch.float16
        return torch.bfloat16 if self.weights == "int4" else torch.float32

    def _on_cpu(self) -> bool:
        return str(self.device).split(":")[0] == "cpu"

    def stage_disk_reads(self) -> bool:
        """Disk reads go through host staging buffers: always on CUDA (pinned), else if asked."""
        on_cuda = self.torch_device().type == "cuda"
        if on_cuda and self.staged_disk is False:
            raise PipoError("on CUDA, disk blocks must pass through pinned staging buffers; "
                            "leave staged_disk unset")
        return on_cuda if self.staged_disk is None else self.staged_disk

    def for_source(self, source) -> EngineOptions:
        """These options with ``weights="auto"`` resolved to the source's own format: an offload store
        holding int4 weights computes on them, with its smallest group (when a valid ``group_size``);
        so does a GGUF file whose layers are 4-bit, on the CPU when no ``dtype`` is asked for (the
        4-bit path is the faster one there; ``--dtype`` forces dense compute)."""
        group = getattr(source, "int4_group_size", None)
        if group is None and self.dtype is None and self._on_cpu():
            group = getattr(source, "kept_int4_group", None)
        if self.weights != "auto" or group is None:
            return self
        return replace(self, weights="int4",
                       group_size=group if group in INT4_GROUP_SIZES else self.group_size)

    def int4_group(self) -> int | None:
        """Group size when weights are int4, else ``None``."""
        return self.group_size if self.weights == "int4" else None

    def offload_tier(self, source) -> str:
        """Where streamed blocks come from: the disk store when the model is one, else host RAM."""
        return DISK if hasattr(source, "read_block_into") else HOST

    def lane_factory(self) -> Callable:
        """Lanes for the device: CUDA streams on the engine's GPU (``cuda:N``), threads and the
        loop on CPU."""
        device = self.torch_device()
        if device.type == "cuda":
            from pipo.runtime.cuda_lanes import cuda_lane

            base = partial(cuda_lane, device=device)
        else:
            from pipo.runtime.lanes import cpu_lane

            base = cpu_lane
        if self.link_gbps is None:
            return base
        return partial(_throttled_lane, base, self.link_gbps * 1e9, device.type == "cuda")


def _throttled_lane(base: Callable, bps: float, enqueue_only: bool, name: str):
    """Lane ``name`` from ``base``; host<->device copy lanes capped at ``bps`` bytes/s."""
    from pipo.engine.transfer import transfer_nbytes
    from pipo.runtime.tasks import LOAD_KV, LOAD_WEIGHT, SAVE_KV
    from pipo.runtime.throttle import ThrottledLane

    lane = base(name)
    if name not in (LOAD_WEIGHT, LOAD_KV, SAVE_KV):
        return lane
    return ThrottledLane(lane, bps, transfer_nbytes, enqueue_only=enqueue_only)
