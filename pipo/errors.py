"""User-facing errors.

Every problem caused by bad input (a missing file, an unsupported model, an impossible memory budget,
invalid sampling values) is raised as a :class:`PipoError` with one sentence that says what is wrong
and what to do. The CLI prints that sentence (:meth:`PipoError.for_cli`: the command line's wording
where it differs from the Python API's) and exits with :data:`EXIT_USER_ERROR`; it never shows a
traceback for a ``PipoError``. Anything else escaping is a bug in pipo.
"""

EXIT_USER_ERROR = 2
MIB = 2**20


class PipoError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""

    def for_cli(self) -> str:
        """The sentence as the ``pipo`` command shows it (``str(self)`` is the Python API's)."""
        return str(self)


class ModelFormatError(PipoError):
    """A model file or directory is missing, corrupt, truncated or of an unsupported kind."""


class PlanError(PipoError):
    """No valid placement exists for the requested memory budget or batch."""


class DeviceMemoryTooSmall(PlanError):
    """The device memory budget is below the smallest one that plans this run.

    ``minimum_nbytes`` is that smallest budget, exactly; ``kv_offload_minimum_nbytes`` the smallest
    one with the KV cache offloaded, when offloading was not asked for and would lower it. Messages
    quote budgets in MiB rounded *up* to 0.1 MiB, so a quoted value always works as typed.
    """

    def __init__(self, given_nbytes: int, minimum_nbytes: int,
                 kv_offload_minimum_nbytes: int | None = None):
        self.given_nbytes = given_nbytes
        self.minimum_nbytes = minimum_nbytes
        self.kv_offload_minimum_nbytes = kv_offload_minimum_nbytes
        super().__init__(self._sentence(f"device_memory={given_nbytes}",
                                        lambda mib: f"device_memory=int({mib} * 2**20)",
                                        "kv_offload=True"))

    def __reduce__(self):
        # picklable, so that a Ray worker's refusal reaches the driver as itself
        return type(self), (self.given_nbytes, self.minimum_nbytes, self.kv_offload_minimum_nbytes)

    def for_cli(self) -> str:
        """The refusal in command-line terms (``--device-memory``, ``--kv-offload``)."""
        return self._sentence(f"--device-memory {_mib_down(self.given_nbytes)}",
                              lambda mib: f"--device-memory {mib}MiB", "--kv-offload")

    def _sentence(self, given: str, budget, kv_offload: str) -> str:
        text = (f"{given} is too small for this model, batch and length: use at least "
                f"{budget(mib_up(self.minimum_nbytes))}")
        if self.kv_offload_minimum_nbytes is not None:
            text += (f", or {kv_offload} with at least "
                     f"{budget(mib_up(self.kv_offload_minimum_nbytes))}")
        return text


def mib_up(nbytes: int) -> str:
    """``nbytes`` in MiB, rounded up to 0.1 MiB (``251658241`` -> ``"240.1"``)."""
    tenths = -(-nbytes * 10 // MIB)
    return f"{tenths // 10}.{tenths % 10}"


def _mib_down(nbytes: int) -> str:
    """A given budget in MiB rounded down to 0.1 MiB (bytes below that), so that it never reads
    the same as the (rounded-up) minimum it falls short of."""
    tenths = nbytes * 10 // MIB
    if tenths:
        return f"{tenths // 10}.{tenths % 10} MiB"
    return f"{nbytes} byte{'s' if nbytes != 1 else ''}"


class GenerationError(PipoError):
    """Invalid generation request: prompt too long, bad sampling values, empty batch."""
