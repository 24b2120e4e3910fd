"""One exception hierarchy for mmcli.

The CLI maps these to exit codes: :class:`UsageError` and its subclasses mean the
command was asked for something it cannot do (exit 2); other :class:`MMCLIError`
mean the run failed (exit 1). :class:`CaseError` marks a single input that could
not be processed; batch commands record it in that case's row and go on.
"""

from __future__ import annotations


class MMCLIError(Exception):
    """Base class of every error mmcli raises on purpose."""


class UsageError(MMCLIError):
    """The request cannot be carried out as given (bad option, no inputs...)."""


class InputError(UsageError):
    """The inputs named on the command line cannot be used as a whole."""


class WeightsError(UsageError):
    """Weights cannot be found, verified or loaded."""


class CaseError(MMCLIError):
    """One input file cannot be processed; the batch goes on without it."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ReadError(CaseError):
    """A file is not a readable single-frame grey radiograph."""
