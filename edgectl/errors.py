"""The root of every error edgectl raises on purpose.

Each package derives its own hierarchy from :class:`EdgectlError`; the CLI maps them
to one clear line and an exit code, and ``--verbose`` shows the trace.
"""

from __future__ import annotations


class EdgectlError(Exception):
    """An expected failure with a message that tells the user what to do next."""

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} ({self.hint})" if self.hint else base


class UsageError(EdgectlError):
    """The user asked for something that cannot work as given (bad flag, bad file)."""

    exit_code = 2
