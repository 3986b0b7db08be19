"""User-facing errors.

Every problem caused by bad input (a missing file, an unsupported model, an impossible memory budget,
invalid sampling values) is raised as a :class:`PipoError` with one sentence that says what is wrong
and what to do. The CLI prints that sentence and exits with :data:`EXIT_USER_ERROR`; it never shows a
traceback for a ``PipoError``. Anything else escaping is a bug in pipo.
"""

EXIT_USER_ERROR = 2


class PipoError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


class ModelFormatError(PipoError):
    """A model file or directory is missing, corrupt, truncated or of an unsupported kind."""


class PlanError(PipoError):
    """No valid placement exists for the requested memory budget or batch."""


class GenerationError(PipoError):
    """Invalid generation request: prompt too long, bad sampling values, empty batch."""
