"""Hidden work directories of ``convert``, named after the process writing them, and their cleanup.

A store is written into ``.NAME.pipo-convert.BOOT.PID.START.RANDOM`` beside its destination (BOOT: the
first 8 hex digits of the kernel's boot id, PID and START: the writer's pid and start time in clock
ticks since boot), then renamed into place. A writer killed with SIGKILL cannot remove its directory;
:func:`remove_stale_work_dirs` lets the next ``convert`` into the same parent do it, removing only the
directories whose writer is gone: another boot, no such pid, or a pid now held by a younger process.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_MARK = "pipo-convert"
_NAME = re.compile(rf"^\..*\.{_MARK}\.(?P<boot>[0-9a-f]{{8}})\.(?P<pid>\d+)\.(?P<start>\d+)\.[^.]+(\.old)?$")


def make_work_dir(out_path: Path) -> Path:
    """A fresh hidden directory beside ``out_path``, named after this process."""
    prefix = f".{out_path.name}.{_MARK}.{_boot_id()}.{os.getpid()}.{_start_ticks(os.getpid())}."
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out_path.parent))


def remove_stale_work_dirs(parent: Path) -> list[Path]:
    """Remove the work directories in ``parent`` whose writer is dead; return what was removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _NAME.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        if _writer_alive(match["boot"], int(match["pid"]), int(match["start"])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _writer_alive(boot: str, pid: int, start: int) -> bool:
    """Whether the process that named a work directory still runs."""
    if boot != _boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return _start_ticks(pid) == start


def _boot_id() -> str:
    """8 hex digits of this boot's id (``00000000`` where the kernel does not say)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().replace("-", "")[:8]
    except OSError:
        return "0" * 8


def _start_ticks(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot (0 where /proc does not say)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces
