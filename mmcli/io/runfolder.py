"""The run layer: the files every command's run is made of, in one place.

A run writes a **run folder** (``predict --out results.csv``: the report ``results.csv`` and
the folder ``results/``; ``explain``, ``evaluate``, ``train``: a folder holding everything;
``merge --out all.csv``: as predict). In it, whatever the command:

* ``.lock``: held for the whole run (:class:`RunLock`), so a second run into the same place
  is refused at once;
* ``journal.jsonl``: the finished cases of a batch run (:class:`Journal`), to resume a killed run;
* ``run.json``: what ran and what came of it, in one schema (:func:`run_record`): the command
  and its settings, versions, status, counts, seconds and outputs, then what is the
  command's own (predict's provenance and input list, train's data and calibration, ...).

:func:`open_run_folder` does the checks every command makes before any work, in the same
order: the folder and reports belong to an earlier run of the same command or to nobody
(:mod:`mmcli.io.ownership`), the places can be written (:func:`probe_writable`), then the
lock. :data:`REPORT_FORMATS` is the one table of report suffixes.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from mmcli import __version__
from mmcli.errors import UsageError
from mmcli.io.writers import atomic_path, write_json

__all__ = ["JOURNAL", "LOCK", "REPORT_FORMATS", "RUN_FILES", "RUN_JSON", "RUN_SCHEMA", "Journal", "ReportFormat",
           "RunLayout", "RunLock", "is_hdf5", "open_run_folder", "probe_writable", "report_format", "run_record",
           "write_run_json"]

RUN_JSON, JOURNAL, LOCK = "run.json", "journal.jsonl", ".lock"
RUN_FILES = (RUN_JSON, JOURNAL, LOCK)
"""A run folder's own files: never a case's file."""
RUN_SCHEMA = 1
"""Version of :func:`run_record`'s layout, recorded as ``run.json``'s ``schema``."""

ReportFormat = Literal["csv", "hdf5"]
REPORT_FORMATS: dict[str, ReportFormat] = {".csv": "csv", ".h5": "hdf5", ".hdf5": "hdf5"}
"""Every report suffix and the format it means (a rerun recognises its own report by it too)."""


def report_format(path: Path, option: str = "--out") -> ReportFormat:
    """The format of a report written to ``path``, by its suffix (any case).

    Raises:
        UsageError: the suffix is none of :data:`REPORT_FORMATS`'.
    """
    found = REPORT_FORMATS.get(path.suffix.lower())
    if found is None:
        raise UsageError(f"{option} must end in .csv, .h5 or .hdf5, got {path.name!r}")
    return found


def is_hdf5(path: Path) -> bool:
    """Whether ``path`` names an HDF5 report (``.h5``, ``.hdf5``, any case)."""
    return REPORT_FORMATS.get(path.suffix.lower()) == "hdf5"


@dataclass(frozen=True)
class RunLayout:
    """Where a run's files go: its folder, its main report, the journal, lock and ``run.json``."""

    folder: Path
    report: Path

    @classmethod
    def for_report(cls, report: Path) -> RunLayout:
        """``results.csv`` -> folder ``results/`` beside it (``predict``, ``merge``)."""
        report = report.expanduser().resolve()
        return cls(report.with_suffix(""), report)

    @classmethod
    def in_folder(cls, folder: Path, report_name: str) -> RunLayout:
        """Everything inside ``folder``, the report as ``folder/report_name`` (``explain``, ``evaluate``, ``train``)."""
        folder = folder.expanduser().resolve()
        return cls(folder, folder / report_name)

    @property
    def journal(self) -> Path:
        return self.folder / JOURNAL

    @property
    def manifest(self) -> Path:
        return self.folder / RUN_JSON

    @property
    def lock(self) -> Path:
        return self.folder / LOCK


def open_run_folder(layout: RunLayout, command: str, *, columns: Sequence[str] | None = None,
                    extra_reports: Sequence[Path] = (), holds: bool | None = None,
                    writable: Sequence[Path] = ()) -> RunLock:
    """The checks every run makes before any work, then its lock, taken (release it when the run ends).

    Args:
        layout: the run's folder and main report.
        command: the command writing them (``predict``, ``explain``, ``evaluate``, ``merge``, ``train``).
        columns: the report's columns, for recognising an earlier report of ``command`` by its header;
            None: the report is not a table of cases (its folder's ``run.json`` must name it).
        extra_reports: more reports the run replaces (``explain``'s ``maps.h5``).
        holds: whether the folder holds an earlier run of ``command``, where the command knows better.
        writable: more folders to probe beside the run folder and the report's.

    Raises:
        UsageError: a foreign file or folder is in the way, a place cannot be written, or another
            run holds the lock.
    """
    from mmcli.io import ownership  # here: ownership reads this module's names of a run's files

    ownership.check_folder(layout.folder, command, layout.report, holds=holds)
    if columns is not None:
        for report in (layout.report, *extra_reports):
            ownership.check_report(report, layout.folder, command, columns)
    probe_writable(*dict.fromkeys((layout.folder, layout.report.parent, *writable)))
    lock = RunLock(layout.lock, layout.folder if layout.report.parent == layout.folder else layout.report)
    lock.acquire()
    return lock


def _torch_version() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None:
        return str(torch.__version__)
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def run_record(command: str, *, argv: Sequence[str] | None, settings: Mapping[str, Any], status: str,
               seconds: float | None = None, counts: Mapping[str, int] | None = None,
               outputs: Mapping[str, Any] | None = None, **own: Any) -> dict[str, Any]:
    """A ``run.json`` in the one schema: what every command records, then ``own`` (what is the command's).

    Args:
        command: the mmcli command (``predict``, ``explain``, ``evaluate``, ``merge``, ``train``).
        argv: the command line, or None where it must not be kept (``--anonymize-ids``).
        settings: the command's resolved settings.
        status: ``running``, ``finished``, or how it ended otherwise (``stopped early``, ``diverged``).
        seconds: how long it took (so far). counts: case or image counts. outputs: its folder and files.
    """
    return {
        "schema": RUN_SCHEMA, "mmcli_command": command, "mmcli_version": __version__,
        "command": list(argv) if argv is not None else None, "settings": dict(settings), "status": status,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": _torch_version(), "platform": sys.platform},
        "seconds": None if seconds is None else round(seconds, 3),
        "counts": None if counts is None else dict(counts),
        "outputs": None if outputs is None else dict(outputs),
        **own,
    }


def write_run_json(layout: RunLayout, record: Mapping[str, Any]) -> None:
    """Write ``record`` (:func:`run_record`) as the run folder's ``run.json``, atomically."""
    write_json(layout.manifest, record)


class Journal:
    """Append-only JSON-lines record of finished cases, flushed after every write.

    The first line is a header (e.g. the weights' sha256); each later line one case row.
    A line cut short by a kill is ignored on reading.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: Any = None

    def read(self) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Return the header and the last row recorded for each case id."""
        header: dict[str, Any] = {}
        rows: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return header, rows
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if i == 0 and "header" in record:
                    header = record["header"]
                elif "case_id" in record:
                    rows[str(record["case_id"])] = record
        return header, rows

    def start(self, header: Mapping[str, Any], rows: Iterable[Mapping[str, Any]] = (), *,
              command: str | None = None) -> None:
        """(Re)write the journal with ``header`` and the ``rows`` carried over, then keep it open.

        ``command`` (``predict``, ``explain``) is recorded beside the header: the folder is then
        known as that command's run (:mod:`mmcli.io.ownership`) even before its ``run.json``.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        first = {"header": dict(header), **({"command": command} if command else {})}
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(first) + "\n")
            for row in rows:
                f.write(json.dumps(dict(row), default=str) + "\n")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def append(self, row: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(dict(row), default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class RunLock:
    """An exclusive lock on a run folder for a whole run (``flock`` on a lock file in it).

    The kernel drops the lock when its process ends, however it ends, so a killed run
    never leaves a stale lock behind. The holder's pid is written into the file for the
    message a second run gets.
    """

    def __init__(self, path: str | os.PathLike[str], what: str | os.PathLike[str]) -> None:
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self) -> None:
        """Raises: UsageError: another process holds the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"another mmcli run (pid {holder}) is writing {self.what}: wait for it to finish, "
                             "or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def probe_writable(*folders: str | os.PathLike[str]) -> None:
    """Create each folder and a file in it, before any work, so a bad ``--out`` fails at once.

    Raises:
        UsageError: a folder cannot be created or written (parent is a file, read-only
            file system, no permission, disk full), naming it and the cause.
    """
    for folder in folders:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe.", dir=folder)
            try:
                os.write(fd, b"mmcli")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as err:
            raise UsageError(f"cannot write the outputs to {folder}: {err.strerror or err}") from None
