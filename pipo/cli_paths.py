"""Output paths checked before any work starts, so a long run never ends in an OSError.

A check creates (and removes) a real file where the output will go: permission bits alone say
nothing for root or on read-only mounts, and the real write goes through a temporary file in the
same directory anyway.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipo.errors import PipoError


def check_output_file(path: Path, flag: str) -> None:
    """Refuse ``path`` (given with ``flag``) unless a file can be written there."""
    if path.is_dir():
        raise PipoError(f"{flag} {path} is a directory; give a file name inside it, "
                        f"e.g. {path / 'out.jsonl'}")
    check_writable_dir(path.parent, f"{flag} {path}")


def check_writable_dir(directory: Path, what: str) -> None:
    """Refuse ``directory`` (named in messages as ``what``) unless files can be created in it."""
    if not directory.exists():
        raise PipoError(f"{what}: no such directory {directory} (create it first)")
    if not directory.is_dir():
        raise PipoError(f"{what}: {directory} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".pipo-write-check-"):
            pass
    except OSError as exc:
        raise PipoError(f"{what}: cannot create files in {directory} ({exc.strerror})") from None
