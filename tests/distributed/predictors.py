"""PipoPredictor subclasses that Ray workers import by name: one dies once, one records what it
did.

They find their scratch directory in the environment the test's cluster was started with.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipo.distributed import PipoPredictor

MARKERS_ENV = "PIPO_TEST_RAY_MARKERS"


def _marker(name: str) -> Path:
    return Path(os.environ[MARKERS_ENV]) / name


class DiesOnce(PipoPredictor):
    """Generates its batch, then the first worker to finish one exits before returning it."""

    def __call__(self, batch):
        out = super().__call__(batch)
        try:
            fd = os.open(_marker("died"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return out
        os.write(fd, ",".join(str(i) for i in batch["index"]).encode())
        os.close(fd)
        os._exit(1)  # the worker dies with the batch in flight


class Records(PipoPredictor):
    """Writes ``opened-PID`` once its engine is open, ``closed-PID`` when it closes it and
    ``batch-I,J,...`` (input indices) for each batch it generates."""

    def __init__(self, config):
        super().__init__(config)
        _marker(f"opened-{os.getpid()}").touch()

    def __call__(self, batch):
        _marker("batch-" + ",".join(str(i) for i in batch["index"])).touch()
        return super().__call__(batch)

    def close(self) -> None:
        had_engine = getattr(self, "engine", None) is not None
        super().close()
        if had_engine:
            _marker(f"closed-{os.getpid()}").touch()
