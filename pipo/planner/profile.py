"""The machine profile: measured bandwidths and compute-time fits, cached as JSON per machine.

A :class:`Profile` is what :mod:`pipo.planner.probe` measures and what the cost model
(:mod:`pipo.planner.costs`) turns into task durations. It is saved under the user's cache
directory (``$XDG_CACHE_HOME/pipo``, default ``~/.cache/pipo``), one file per *hardware key* (CPU
model and count, RAM, torch version, device, dtype), and reused until that key changes.
:func:`nominal_profile` is the stand-in used when no profile was measured yet (``pipo probe``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pipo.runtime.render import atomic_write

PROFILE_VERSION = 6  # 6: the disk read rate probed over bytes never read before


@dataclass(frozen=True)
class ComputeFit:
    """Seconds of one block's compute: ``fixed_s`` per matrix product, plus ``s_per_weight_byte``
    per weight byte read, ``s_per_flop`` per multiply-add pair of the products (2·tokens·weights),
    ``s_per_attn_flop`` per 2·tokens·context·(query width) of attention, ``s_per_elem`` per
    element of the hidden state touched by norms and activations (tokens·width), and
    ``s_per_gemm_weight_byte`` more per weight byte when the products have
    :data:`~pipo.planner.costs.GEMM_MIN_ROWS` rows or more (a matrix-matrix kernel at a few rows
    reads its weights slower than the matrix-vector one: a CPU head over 4 rows takes about twice
    one row's time)."""

    fixed_s: float = 20e-6
    s_per_weight_byte: float = 1 / 10e9
    s_per_flop: float = 1 / 50e9
    s_per_attn_flop: float = 1 / 20e9
    s_per_elem: float = 2e-9
    s_per_gemm_weight_byte: float = 0.0


@dataclass(frozen=True)
class Profile:
    """One machine, as measured: bandwidths in bytes per second, times in seconds.

    ``h2d_*`` / ``d2h_*``: host -> device and back, from pinned and pageable host memory (on a CPU:
    a memcpy into a slot); ``disk_read_bps`` and ``disk_block_s``: one block read from an offload
    store on its file system, as the engine reads it, costs
    ``disk_block_s + nbytes / disk_read_bps``;
    ``task_overhead_s``: the scheduler's own cost per task; ``step_overhead_s``: host work per step
    besides the tasks (inputs, logits, sampling); ``compute``: the block compute fit with the
    weights read from memory, ``compute_hot`` with them in the last-level cache of
    ``cache_nbytes`` bytes (a block's later micro-batches in a step; ``None``: as ``compute``).
    """

    key: str
    device: str
    dtype: str
    h2d_pinned_bps: float
    h2d_pageable_bps: float
    d2h_pinned_bps: float
    d2h_pageable_bps: float
    disk_read_bps: float
    task_overhead_s: float
    step_overhead_s: float
    compute: ComputeFit
    thread_task_overhead_s: float = 100e-6
    disk_block_s: float = 0.0
    compute_hot: ComputeFit | None = None
    cache_nbytes: int = 0
    measured: bool = True
    version: int = PROFILE_VERSION

    def to_json(self) -> str:
        """The profile as JSON text."""
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, doc: dict) -> Profile:
        """A profile from :meth:`to_json`'s data."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in names}
        values["compute"] = ComputeFit(**doc["compute"])
        if doc.get("compute_hot") is not None:
            values["compute_hot"] = ComputeFit(**doc["compute_hot"])
        return cls(**values)


def cache_dir() -> Path:
    """Where profiles live: ``$XDG_CACHE_HOME/pipo`` or ``~/.cache/pipo``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pipo"


def hardware_key(device: str, dtype: str) -> str:
    """A short hash of what the measurements depend on: CPU, cores, RAM, torch, device, dtype."""
    import torch

    parts = [platform.machine(), _cpu_model(), str(os.cpu_count()), str(_ram_nbytes() >> 30),
             torch.__version__, device, dtype]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(torch.device(device)))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def profile_path(key: str) -> Path:
    """The cache file of the profile with hardware key ``key``."""
    return cache_dir() / f"profile-{key}.json"


def load_profile(device: str, dtype: str) -> Profile | None:
    """This machine's cached profile for ``device`` and ``dtype``, or ``None``."""
    path = profile_path(hardware_key(device, dtype))
    try:
        doc = json.loads(path.read_text())
        if doc.get("version") != PROFILE_VERSION:
            return None
        return Profile.from_dict(doc)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_profile(profile: Profile) -> Path:
    """Write ``profile`` to its cache file (atomically); return the path."""
    path = profile_path(profile.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, profile.to_json())


def nominal_profile(device: str = "cpu", dtype: str = "float32") -> Profile:
    """Round numbers for a machine not measured yet (10 GB/s links, 1.5 GB/s disk)."""
    return Profile(key="nominal", device=device, dtype=dtype, h2d_pinned_bps=10e9,
                   h2d_pageable_bps=10e9, d2h_pinned_bps=10e9, d2h_pageable_bps=10e9,
                   disk_read_bps=1.5e9, disk_block_s=200e-6, task_overhead_s=30e-6, step_overhead_s=300e-6,
                   compute=ComputeFit(), measured=False)


def profile_for(device: str, dtype: str) -> Profile:
    """The cached profile, else :func:`nominal_profile` (nothing is measured here)."""
    return load_profile(device, dtype) or nominal_profile(device, dtype)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def _ram_nbytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def free_ram_nbytes() -> int:
    """Bytes of RAM available now (``MemAvailable``), the default host-memory cap."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return _ram_nbytes()
