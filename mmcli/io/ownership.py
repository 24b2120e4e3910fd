"""Which files a run may replace or remove: mmcli's own outputs of the same command, nothing else.

A run writes one or more reports and a run folder (``predict --out results.csv``: the report
``results.csv`` and the folder ``results/``; ``explain`` and ``evaluate``: a folder holding
everything). Before any work, every place it would write is checked; the rule holds with
``--overwrite`` too:

* **A report path that exists** must be a report of the same command. It is one when the
  ``run.json`` of its run folder (written by mmcli: ``mmcli_version`` in it or its
  ``provenance``) lists it among its ``outputs`` and names no other command, or when the file
  itself is one: a CSV whose header row is exactly the command's columns, or an HDF5 file with
  mmcli's ``mmcli_version`` attribute and a ``cases`` table of exactly those columns. A user's
  ``mydata.csv`` or ``labels.csv`` is neither, so it is refused (exit 2), never replaced.
* **A run folder that exists** and holds anything but hidden files must hold an earlier run of
  the same command: its ``run.json`` or its journal's first line names the command (or, written
  before they did, its ``run.json`` lists the report).

A rerun (resuming, or starting again with ``--overwrite``) removes the earlier run's files that
the new run does not write: only those the earlier run recorded as its own, the files its
journal rows and report rows name (:func:`recorded_files`), and only inside its run folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmcli.errors import UsageError
from mmcli.io.runfolder import JOURNAL, is_hdf5
from mmcli.io.runfolder import RUN_JSON as MANIFEST


def _json_file(path: Path, *, first_line: bool = False) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.readline()) if first_line else json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The run folder's ``run.json``, if mmcli wrote it (``mmcli_version`` in it or its provenance)."""
    data = _json_file(folder / MANIFEST)
    if data is None:
        return None
    provenance = data.get("provenance")
    if "mmcli_version" in data or isinstance(provenance, dict) and "mmcli_version" in provenance:
        return data
    return None


def _manifest_command(manifest: Mapping[str, Any]) -> str | None:
    """The command that wrote a ``run.json``: ``mmcli_command``, or ``merge`` for a merge's from before it was
    recorded (``"command": "merge"``)."""
    if isinstance(manifest.get("mmcli_command"), str):
        return str(manifest["mmcli_command"])
    return "merge" if manifest.get("command") == "merge" else None


def _manifest_reports(manifest: Mapping[str, Any]) -> set[Path]:
    outputs = manifest.get("outputs")
    reports = outputs.get("reports") if isinstance(outputs, dict) else None
    return {Path(str(r)) for r in reports} if isinstance(reports, list) else set()


def journal_command(folder: Path) -> tuple[bool, str | None]:
    """Whether ``folder`` holds a journal mmcli wrote (a header first), and the command it names."""
    first = _json_file(folder / JOURNAL, first_line=True)
    if first is None or not isinstance(first.get("header"), dict):
        return False, None
    command = first.get("command")
    return True, command if isinstance(command, str) else None


def holds_run_of(folder: Path, command: str, report: Path) -> bool:
    """Whether ``folder`` holds an earlier run of ``command`` whose main report is ``report``."""
    manifest = read_manifest(folder)
    if manifest is not None:
        named = _manifest_command(manifest)
        if named is not None:
            return named == command
        return report in _manifest_reports(manifest)  # written before run.json named its command
    journal, named = journal_command(folder)
    return journal and named in (None, command)


def report_is_own(path: Path, folder: Path, command: str, columns: Sequence[str]) -> bool:
    """Whether the existing file ``path`` is a report of ``command`` (see the module docstring)."""
    manifest = read_manifest(folder)
    if manifest is not None and path in _manifest_reports(manifest) \
            and _manifest_command(manifest) in (None, command):
        return True
    return has_report_columns(path, columns)


def has_report_columns(path: Path, columns: Sequence[str]) -> bool:
    """Whether ``path`` is a CSV whose header row is exactly ``columns``, or an HDF5 file mmcli wrote
    (``mmcli_version`` attribute) with a ``cases`` table of exactly those columns."""
    if is_hdf5(path):
        import h5py

        try:
            with h5py.File(path, "r") as h5:
                cases = h5.get("cases")
                return "mmcli_version" in h5.attrs and cases is not None and set(cases) == set(columns)
        except (OSError, ValueError):
            return False
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return header == list(columns)


def check_report(path: Path, folder: Path, command: str, columns: Sequence[str]) -> None:
    """Refuse to write the report ``path`` over a file that is not a ``command`` report.

    Raises:
        UsageError: naming the file, with ``--overwrite`` too.
    """
    if (path.exists() or path.is_symlink()) and not (path.is_file() and report_is_own(path, folder, command,
                                                                                       columns)):
        raise UsageError(f"{path} exists and is not a report of an earlier `mmcli {command}` run: mmcli never "
                         "replaces a file it did not write (not even with --overwrite); choose another --out")


def visible_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` that are not hidden (a lock, a probe or partial results are)."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def check_folder(folder: Path, command: str, report: Path, *, holds: bool | None = None) -> None:
    """Refuse a run folder that exists, holds visible files and no earlier run of ``command``.

    Args:
        holds: whether it holds such a run, where the command knows better (``evaluate``);
            by default :func:`holds_run_of`.

    Raises:
        UsageError: naming the folder and one of its files.
    """
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder: mmcli never replaces a file it did not write; "
                         "choose another --out")
    entries = visible_entries(folder) if folder.is_dir() else []
    if not entries:
        return
    if holds is None:
        holds = holds_run_of(folder, command, report)
    if not holds:
        raise UsageError(f"{folder} already holds files that no earlier `mmcli {command}` run wrote (such as "
                         f"{entries[0].name}): mmcli never writes into such a folder (not even with --overwrite); "
                         "choose another --out")


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies inside ``folder``, both by name and once links are followed."""
    normal = Path(os.path.normpath(path))
    real_parent = Path(os.path.realpath(normal.parent)) / normal.name
    real_folder = Path(os.path.realpath(folder))
    return folder in normal.parents and real_folder in real_parent.parents


def recorded_files(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], base: Path, folder: Path,
                   ) -> set[Path]:
    """The files that ``rows`` (of a journal or a report) name in ``columns``, relative to ``base``,
    that lie inside the run ``folder``: what an earlier run recorded as its own."""
    found = set()
    for row in rows:
        for column in columns:
            value = row.get(column)
            if isinstance(value, str) and value and not os.path.isabs(value):
                path = Path(os.path.normpath(base / value))
                if inside(path, folder):
                    found.add(path)
    return found


def remove_files(paths: Iterable[Path], folder: Path) -> int:
    """Remove each of ``paths`` inside ``folder`` (a link itself, never its target), then the
    folders that leaves empty up to ``folder``; returns how many files went."""
    removed = 0
    for path in sorted(paths):
        if not inside(path, folder) or not (path.is_file() or path.is_symlink()):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
        parent = path.parent
        while parent != folder and folder in parent.parents:
            try:
                parent.rmdir()
            except OSError:  # not empty
                break
            parent = parent.parent
    return removed


def report_rows(path: Path, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of an earlier report (CSV or HDF5), ``columns`` only; none where it cannot be read."""
    if not path.is_file():
        return []
    if is_hdf5(path):
        import h5py

        try:
            with h5py.File(path, "r") as h5:
                cases = h5["cases"]
                cells = {c: [v.decode() if isinstance(v, bytes) else v for v in cases[c][()]]
                         for c in columns if c in cases}
        except (OSError, KeyError, ValueError):
            return []
        n = max((len(v) for v in cells.values()), default=0)
        return [{c: v[i] for c, v in cells.items()} for i in range(n)]
    from mmcli.io.writers import read_csv_rows

    try:
        return read_csv_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
