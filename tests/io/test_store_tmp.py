"""Work directories of ``convert``: only those of dead writers are removed."""

from __future__ import annotations

import os
import subprocess
import sys

from pipo.io.store_tmp import _boot_id, _start_ticks, make_work_dir, remove_stale_work_dirs


def _named(parent, boot, pid, start):
    path = parent / f".store.pipo-convert.{boot}.{pid}.{start}.abc123"
    path.mkdir()
    (path / "blocks.bin").write_bytes(b"x" * 100)
    return path


def test_only_dirs_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    me, boot = os.getpid(), _boot_id()
    live = make_work_dir(tmp_path / "store")
    stale = [
        _named(tmp_path, boot, dead_pid, 1),  # writer exited
        _named(tmp_path, boot, me, _start_ticks(me) + 1),  # pid reused by a younger process (us)
        _named(tmp_path, "deadbeef" if boot != "deadbeef" else "00000000", me, _start_ticks(me)),  # other boot
    ]
    old = tmp_path / f"{live.name}.old"  # an old store moved aside by a live writer
    old.mkdir()
    user = tmp_path / ".store.pipo-convert.mine"
    user.mkdir()
    link = tmp_path / f".x.pipo-convert.{boot}.{dead_pid}.1.zz"
    link.symlink_to(user)
    assert sorted(remove_stale_work_dirs(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, old.name, user.name, link.name])
