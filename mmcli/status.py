"""The status of a case in every report: one type instead of bare strings."""

from __future__ import annotations

from enum import Enum

__all__ = ["Status"]


class Status(str, Enum):
    """A report row's ``status``; a member is its own text (``Status.OK == "ok"``), in CSV, JSON and HDF5 alike.

    * ``ok``: the case has a result (its ``qa_flags`` may still say why to doubt it);
    * ``error``: it failed, ``error`` says why (exit code 1);
    * ``skipped``: a ``--fail-fast`` stop left it out;
    * ``missing``: ``evaluate`` found no prediction for a referenced image.
    """

    OK = "ok"
    ERROR = "error"
    SKIPPED = "skipped"
    MISSING = "missing"

    def __str__(self) -> str:  # its text, as StrEnum gives (Python 3.11) and as reports hold it
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)
