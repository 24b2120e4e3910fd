"""``mmcli merge``: join the shard reports of a sharded ``predict`` run into one report.

``predict --shard K/N`` runs every N-th input from the K-th into ``<out>.shard-K-of-N``
(see :func:`mmcli.batch.take_shard`). Merging N such reports gives what one run over all
inputs gives: the same rows in the same order, the same masks under ``<out>/masks/``, a
CSV or HDF5 report by the suffix of ``--out``, and a ``run.json`` that lists the shards.

Rows come from each shard's journal, which holds them exactly as the run made them (so a
merged CSV has the same bytes as a single run's); cases that a ``--fail-fast`` stop left
``skipped`` come from the shard's report. Shards made with other weights or settings are
refused, and missing shards are named.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mmcli import __version__
from mmcli.errors import UsageError
from mmcli.io.writers import (
    Journal,
    RunLock,
    atomic_path,
    probe_writable,
    read_mask_png,
    write_csv,
    write_hdf5,
    write_json,
)

__all__ = ["MergeSummary", "merge_reports"]

_HDF5 = (".h5", ".hdf5")
_VARYING = ("shard",)  # header keys that differ between the shards of one run
_FILE_COLUMNS = ("mask", "dicom_seg", "dicom_sr")  # report columns that name a file of the run


@dataclass(frozen=True)
class Shard:
    """One shard's report, its run folder, its manifest and its journal."""

    report: Path
    folder: Path
    manifest: dict[str, Any]
    header: dict[str, Any]
    rows: dict[str, dict[str, Any]]

    @property
    def part(self) -> tuple[int, int]:
        k, n = self.header["shard"]
        return int(k), int(n)


@dataclass(frozen=True)
class MergeSummary:
    """What a merge wrote: the report, the number of rows per status, and the shards."""

    report: Path
    counts: dict[str, int]
    shards: int
    seconds: float


def _read_report_rows(report: Path) -> list[dict[str, Any]]:
    """The rows of a predict report (CSV or HDF5), in order, values as stored."""
    if report.suffix.lower() in _HDF5:
        with h5py.File(report, "r") as h5:
            table = {col: h5["cases"][col][()] for col in h5["cases"]}
        n = len(table["case_id"])
        rows = []
        for i in range(n):
            row = {}
            for col, values in table.items():
                value = values[i]
                row[col] = value.decode() if isinstance(value, bytes) else (None if np.isnan(value) else float(value))
            rows.append(row)
        return rows
    with open(report, newline="", encoding="utf-8") as f:
        return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(f)]


def _open_shard(report: Path) -> Shard:
    report = report.expanduser().resolve()
    folder = report.with_suffix("")
    manifest_path = folder / "run.json"
    if not report.is_file() or not manifest_path.is_file():
        raise UsageError(f"{report} is not a finished `mmcli predict --shard` report (no report or no "
                         f"{manifest_path})")
    header, journal_rows = Journal(folder / "journal.jsonl").read()
    if not header.get("shard"):
        raise UsageError(f"{report} was not made with --shard: nothing to merge")
    rows = {}
    for row in _read_report_rows(report):
        kept = journal_rows.get(str(row["case_id"]))
        rows[str(row["case_id"])] = dict(kept) if kept is not None and kept.get("status") == row["status"] else row
    return Shard(report, folder, json.loads(manifest_path.read_text(encoding="utf-8")), header, rows)


def _same_run(shards: Sequence[Shard]) -> None:
    first = shards[0]

    def key(s: Shard) -> dict[str, Any]:
        header = {k: v for k, v in s.header.items() if k not in _VARYING}
        return {**header, "n": s.part[1], "inputs": s.manifest.get("settings", {}).get("inputs")}
    for shard in shards[1:]:
        a, b = key(first), key(shard)
        if a != b:
            changed = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in dict.fromkeys([*a, *b])
                                if a.get(k) != b.get(k))
            raise UsageError(f"{shard.report} was made with other weights or settings than {first.report} "
                             f"({changed}): these are not shards of one run")
    n = first.part[1]
    parts = [s.part[0] for s in shards]
    duplicated = sorted({k for k in parts if parts.count(k) > 1})
    if duplicated:
        raise UsageError(f"shard(s) {', '.join(map(str, duplicated))} of {n} given more than once")
    missing = sorted(set(range(n)) - set(parts))
    if missing:
        names = ", ".join(f"{k}/{n}" for k in missing)
        raise UsageError(f"shard(s) {names} missing: run `mmcli predict ... --shard K/{n}` for each, "
                         f"then merge all {n}")


def _interleave(shards: Sequence[Shard]) -> list[tuple[Shard, dict[str, Any]]]:
    """Rows in the order of a single run: shard K holds inputs K, K + N, K + 2N, ..."""
    by_part = sorted(shards, key=lambda s: s.part[0])
    lists = [list(s.rows.values()) for s in by_part]
    out = []
    for i in range(max(map(len, lists))):
        for shard, rows in zip(by_part, lists, strict=True):
            if i < len(rows):
                out.append((shard, rows[i]))
    return out


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def merge_reports(reports: Sequence[Path], out: Path, *, columns: Sequence[str]) -> MergeSummary:
    """Merge the shard reports ``reports`` of one sharded predict run into ``out``.

    Args:
        columns: the report's columns (:data:`mmcli.predict.REPORT_COLUMNS`).

    Raises:
        UsageError: no reports, a report that is not a finished shard, shards of runs with
            other weights or settings, a shard given twice or missing, an unwritable ``out``.
    """
    started = time.perf_counter()
    if not reports:
        raise UsageError("No shard reports given: name the <out>.shard-K-of-N reports of one run")
    out = out.expanduser().resolve()
    if out.suffix.lower() not in (".csv", *_HDF5):
        raise UsageError(f"--out must end in .csv, .h5 or .hdf5, got {out.name!r}")
    shards = [_open_shard(Path(r)) for r in reports]
    _same_run(shards)
    folder = out.with_suffix("")
    probe_writable(folder)
    with RunLock(folder / ".lock", out):
        rows = []
        for shard, row in _interleave(shards):
            row = dict(row)
            for column in _FILE_COLUMNS:  # files of the case in the shard's folder: the same place in ours
                if row.get(column):
                    source = shard.report.parent / str(row[column])
                    target = folder / source.relative_to(shard.folder)
                    _copy(source, target)
                    row[column] = os.path.relpath(target, out.parent)
            rows.append(row)
        if out.suffix.lower() in _HDF5:
            def mask(row: dict[str, Any]) -> np.ndarray | None:
                return read_mask_png(out.parent / row["mask"]) if row.get("mask") else None

            write_hdf5(out, rows, columns, masks=mask, attrs=dict(shards[0].manifest.get("provenance", {})))
        else:
            write_csv(out, rows, columns)
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "error", "skipped")}
        counts = {"total": len(rows), **counts}
        first = shards[0].manifest
        write_json(folder / "run.json", {
            "command": "merge",
            "mmcli_version": __version__,
            "merged_from": [str(s.report) for s in sorted(shards, key=lambda s: s.part[0])],
            "settings": {**first.get("settings", {}), "shard": None, "out": str(out)},
            "provenance": first.get("provenance"),
            "device": first.get("device"),
            "precision": first.get("precision"),
            "counts": counts,
            "outputs": {"folder": str(folder), "reports": [str(out)]},
        })
    return MergeSummary(out, counts, len(shards), time.perf_counter() - started)
