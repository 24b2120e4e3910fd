"""``mmcli merge``: join the shard reports of a sharded ``predict`` run into one report.

``predict --shard K/N`` runs every N-th input from the K-th into ``<out>.shard-K-of-N``
(see :func:`mmcli.batch.take_shard`). Merging N such reports gives what one run over all
inputs gives: the same rows in the same order, the same masks under ``<out>/masks/``, a
CSV or HDF5 report by the suffix of ``--out``, and a ``run.json`` that lists the shards.

Rows come from each shard's journal, which holds them exactly as the run made them (so a
merged CSV has the same bytes as a single run's); cases that a ``--fail-fast`` stop left
``skipped`` come from the shard's report. Shards made with other weights or settings are
refused, and missing shards are named.

A merge verifies before it writes. Each shard's ``run.json`` records the fingerprint of the
whole ordered input list and of its own share (:func:`mmcli.batch.input_list_record`):
shards of other input lists (a file added between two shard jobs) are refused, and so is a
shard whose rows are not exactly its share (a case missing, duplicated or changed). A file
path read from a shard's report or journal must lead into that shard's folder, and its copy
into the merge's: ``masks/../../x`` is refused, never copied.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mmcli.errors import UsageError
from mmcli.io.discover import input_list_sha256
from mmcli.io.paths import inside
from mmcli.io.runfolder import (
    JOURNAL,
    RUN_FILES,
    RUN_JSON,
    Journal,
    RunLayout,
    is_hdf5,
    open_run_folder,
    report_format,
    run_record,
    write_run_json,
)
from mmcli.io.writers import atomic_path, read_csv_rows, read_mask_png, write_csv, write_hdf5
from mmcli.status import Status

__all__ = ["MergeSummary", "merge_reports"]

_VARYING = ("shard",)  # header keys that differ between the shards of one run


@dataclass(frozen=True)
class Shard:
    """One shard's report, its run folder, its manifest and journal header, and its rows in order."""

    report: Path
    folder: Path
    manifest: dict[str, Any]
    header: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def part(self) -> tuple[int, int]:
        k, n = self.header["shard"]
        return int(k), int(n)

    @property
    def input_list(self) -> dict[str, Any]:
        return self.manifest["input_list"]


@dataclass(frozen=True)
class MergeSummary:
    """What a merge wrote: the report, the number of rows per status, and the shards."""

    report: Path
    counts: dict[str, int]
    shards: int
    seconds: float


def _read_report_rows(report: Path) -> list[dict[str, Any]]:
    """The rows of a predict report (CSV or HDF5), in order, values as stored (CSV: read so
    that writing them again gives the same cells)."""
    if is_hdf5(report):
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
    else:
        rows = read_csv_rows(report, exact=True)
    for row in rows:
        row["case_id"] = str(row.get("case_id"))  # exact reading gives the text of a number back
    return rows


def _open_shard(report: Path) -> Shard:
    report = report.expanduser().resolve()
    folder = report.with_suffix("")
    manifest_path = folder / RUN_JSON
    if not report.is_file() or not manifest_path.is_file():
        raise UsageError(f"{report} is not a finished `mmcli predict --shard` report (no report or no "
                         f"{manifest_path})")
    header, journal_rows = Journal(folder / JOURNAL).read()
    if not header.get("shard"):
        raise UsageError(f"{report} was not made with --shard: nothing to merge")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest["input_list"] = _input_list(manifest["input_list"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{report}: its run.json ({manifest_path}) records no input list, so mmcli cannot check "
                         "that the shards together hold every input once: run the shard again with this "
                         "version") from None
    rows, seen = [], set()
    for row in _read_report_rows(report):
        case_id = row["case_id"]
        if case_id in seen:
            raise UsageError(f"{report} holds case {case_id!r} twice: each shard holds each of its cases once")
        seen.add(case_id)
        kept = journal_rows.get(case_id)
        rows.append(dict(kept) if kept is not None and kept.get("status") == row["status"] else row)
    return Shard(report, folder, manifest, header, rows)


def _input_list(record: dict[str, Any]) -> dict[str, Any]:
    """A run.json's ``input_list`` (see :func:`mmcli.batch.input_list_record`) with its types checked."""
    def part(r: dict[str, Any]) -> dict[str, Any]:
        count, sha256 = int(r["count"]), str(r["sha256"])
        if count < 0 or len(sha256) != 64:
            raise ValueError("not an input list")
        return {"count": count, "sha256": sha256}
    return {**part(record), "share": part(record["share"])}


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
    for shard in shards[1:]:
        a, b = first.input_list, shard.input_list
        if (a["count"], a["sha256"]) != (b["count"], b["sha256"]):
            raise UsageError(f"{shard.report} was made from another input list than {first.report} ({b['count']} "
                             f"inputs, sha256 {b['sha256'][:12]}... against {a['count']}, {a['sha256'][:12]}...): "
                             "the inputs changed between the shard jobs; run every shard again on the same inputs")
    for shard in shards:
        _check_share(shard)


def _check_share(shard: Shard) -> None:
    """The shard's rows are exactly its part of the input list: every N-th from the K-th, in order."""
    (k, n), total = shard.part, int(shard.input_list["count"])
    expected = len(range(k, total, n))
    share = shard.input_list["share"]
    if len(shard.rows) != expected or int(share["count"]) != expected:
        what = "a case is missing" if len(shard.rows) < expected else "it holds cases that are not its own"
        raise UsageError(f"{shard.report} has {len(shard.rows)} rows, but its share of the {total} inputs is "
                         f"{expected}: {what}")
    if input_list_sha256([r["case_id"] for r in shard.rows]) != share["sha256"]:
        raise UsageError(f"{shard.report}: its rows are not the cases its run.json records for shard {k}/{n} "
                         "(a case was changed, replaced or moved)")


def _interleave(shards: Sequence[Shard]) -> list[tuple[Shard, dict[str, Any]]]:
    """Rows in the order of a single run: shard K holds inputs K, K + N, K + 2N, ..."""
    by_part = sorted(shards, key=lambda s: s.part[0])
    out = []
    for i in range(max(len(s.rows) for s in by_part)):
        for shard in by_part:
            if i < len(shard.rows):
                out.append((shard, shard.rows[i]))
    return out


def _check_out(out: Path, folder: Path, shards: Sequence[Shard]) -> None:
    for shard in shards:
        own = Path(os.path.realpath(shard.folder))
        if out == shard.report or any(p == own or inside(p, own) for p in (Path(os.path.realpath(folder)), out)):
            raise UsageError(f"--out {out} would write over shard {shard.report} or its folder: choose an --out "
                             "outside the shards")


def _plan_copies(pairs: Sequence[tuple[Shard, dict[str, Any]]], folder: Path,
                 file_columns: Sequence[str]) -> list[list[tuple[str, Path, Path]]]:
    """For each row, ``(column, source, target)`` of each file it names, all checked before anything is written.

    Raises:
        UsageError: a path that leads out of the shard's own folder (``masks/../../x``, an
            absolute path, a link), or whose copy would land outside the merge's folder or on
            one of its own files, a file named twice, or one that does not exist.
    """
    real_folder = Path(os.path.realpath(folder))
    taken: dict[Path, str] = {}
    plans = []
    for shard, row in pairs:
        own = Path(os.path.realpath(shard.folder))
        plan = []
        for column in file_columns:
            if not row.get(column):
                continue
            named = str(row[column])
            where = f"{shard.report}: case {row['case_id']!r} names the {column} file {named!r}"
            source = Path(os.path.realpath(shard.report.parent / named))
            if not inside(source, own):
                raise UsageError(f"{where}, which is not inside the shard's folder {own}: refused, nothing written")
            target = folder / source.relative_to(own)
            real_target = Path(os.path.realpath(target))
            if not inside(real_target, real_folder) or real_target in {real_folder / f for f in RUN_FILES}:
                raise UsageError(f"{where}, whose copy would not be a case's file in {folder}: refused, nothing "
                                 "written")
            if real_target in taken:
                raise UsageError(f"{where}, which case {taken[real_target]!r} names too: refused, nothing written")
            if not source.is_file():
                raise UsageError(f"{where}, which does not exist: run the shard again")
            taken[real_target] = str(row["case_id"])
            plan.append((column, source, target))
        plans.append(plan)
    return plans


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def merge_reports(reports: Sequence[Path], out: Path, *, columns: Sequence[str], file_columns: Sequence[str],
                  command: Sequence[str] | None = None) -> MergeSummary:
    """Merge the shard reports ``reports`` of one sharded predict run into ``out``.

    Args:
        columns: the report's columns (:data:`mmcli.predict.REPORT_COLUMNS`).
        file_columns: those that name a case's files (:data:`mmcli.predict.FILE_COLUMNS`).
        command: the command line, recorded in ``run.json``.

    Everything is checked before anything is written: the shards' settings and input lists,
    that each shard's rows are exactly its share of the inputs, that every file a row names
    lies in its shard's folder and is copied into ours, and that ``out`` and its folder are
    the merge's own or new (:func:`mmcli.io.runfolder.open_run_folder`).

    Raises:
        UsageError: no reports, a report that is not a finished shard, shards of runs with
            other weights or settings or of other input lists, a shard given twice or
            missing, a shard that lacks a case or holds one twice, a file path that leads out
            of its shard's folder, an ``out`` that names a shard's files, holds a file or
            folder mmcli did not write for a merge, or cannot be written.
    """
    started = time.perf_counter()
    if not reports:
        raise UsageError("No shard reports given: name the <out>.shard-K-of-N reports of one run")
    layout = RunLayout.for_report(out)
    out, folder = layout.report, layout.folder
    report_format(out)
    shards = [_open_shard(Path(r)) for r in reports]
    _check_out(out, folder, shards)
    _same_run(shards)
    pairs = _interleave(shards)
    record = shards[0].input_list
    if input_list_sha256([row["case_id"] for _, row in pairs]) != record["sha256"]:
        raise UsageError(f"the rows of the {len(shards)} shards, in the order of one run, are not the input list "
                         "their run.json records: run every shard again")
    plans = _plan_copies(pairs, folder, file_columns)
    lock = open_run_folder(layout, "merge", columns=columns)
    try:
        rows = []
        for (_, row), plan in zip(pairs, plans, strict=True):
            row = dict(row)
            for column, source, target in plan:  # a case's files in the shard's folder: the same place in ours
                _copy(source, target)
                row[column] = os.path.relpath(target, out.parent)
            rows.append(row)
        if is_hdf5(out):
            def mask(row: Mapping[str, Any]) -> np.ndarray | None:
                return read_mask_png(out.parent / row["mask"]) if row.get("mask") else None

            write_hdf5(out, rows, columns, masks=mask, attrs=dict(shards[0].manifest.get("provenance", {})))
        else:
            write_csv(out, rows, columns)
        counts = {"total": len(rows), **{name: sum(r["status"] == s for r in rows) for name, s in (
            ("ok", Status.OK), ("failed", Status.ERROR), ("skipped", Status.SKIPPED))}}  # as predict counts them
        first = shards[0].manifest
        seconds = time.perf_counter() - started
        write_run_json(layout, run_record(
            "merge", argv=command, settings={**first.get("settings", {}), "shard": None, "out": str(out)},
            status="finished", seconds=seconds, counts=counts,
            outputs={"folder": str(folder), "reports": [str(out)]},
            merged_from=[str(s.report) for s in sorted(shards, key=lambda s: s.part[0])],
            provenance=first.get("provenance"), device=first.get("device"), precision=first.get("precision"),
            input_list={"count": record["count"], "sha256": record["sha256"],
                        "share": {"count": record["count"], "sha256": record["sha256"]}},
        ))
    finally:
        lock.release()
    return MergeSummary(out, counts, len(shards), seconds)
