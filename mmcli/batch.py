"""The run skeleton every batch command shares: layout, lock, resume, engines, rows, run.json.

A command (``predict``, ``explain``) describes its run as a :class:`Job`: the report
columns, what one case produces (a :class:`mmcli.engines.CaseTask`), the settings a
resume must match and how to write its reports. :class:`BatchRun` does the rest, the same
way for every command:

1. takes the run folder's lock (a second run into the same ``--out`` is refused at once);
2. reads the journal of an earlier run into the same place and keeps the cases that are
   still done (refusing a resume with other settings, naming what changed);
3. runs the rest on the engine that suits the device, yielding each finished row, so the
   caller can show progress (it loops: ``for row in run: ...``);
4. when the loop ends, gives the cases a ``--fail-fast`` stop left out a ``skipped`` row,
   writes the reports atomically, then ``run.json``; :attr:`BatchRun.summary` has the counts.

A run stopped in the middle (Ctrl-C, a kill) writes no report; its journal lets the next
run resume where it stopped.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from mmcli import __version__
from mmcli.config import BatchConfig
from mmcli.engines import CaseTask, iter_rows_loader, iter_rows_processes
from mmcli.errors import MMCLIError, UsageError
from mmcli.inference import Predictor
from mmcli.io.discover import InputFile, discover_inputs, input_list_sha256
from mmcli.io.identity import FINGERPRINT, anonymize, fingerprint, same_input
from mmcli.io.writers import Journal, RunLock, probe_writable, write_json
from mmcli.runtime import default_batch_size, default_workers, has_fast_bf16
from mmcli.weights import Checkpoint, load_weights, weights_name

logger = logging.getLogger(__name__)

SKIPPED_REASON = "not processed: the run stopped at the first failure (--fail-fast)"


@dataclass(frozen=True)
class RunLayout:
    """Where a run's files go: its folder, its main report, the journal, lock and ``run.json``."""

    folder: Path
    report: Path

    @classmethod
    def for_report(cls, report: Path) -> RunLayout:
        """``results.csv`` -> folder ``results/`` beside it (``predict``)."""
        report = report.expanduser().resolve()
        return cls(report.with_suffix(""), report)

    @classmethod
    def in_folder(cls, folder: Path, report_name: str) -> RunLayout:
        """Everything inside ``folder``, the report as ``folder/report_name`` (``explain``)."""
        folder = folder.expanduser().resolve()
        return cls(folder, folder / report_name)

    journal = property(lambda self: self.folder / "journal.jsonl")
    manifest = property(lambda self: self.folder / "run.json")
    lock = property(lambda self: self.folder / ".lock")


@dataclass(frozen=True)
class RunSummary:
    """Counts of a finished run; ``failed > 0`` means exit code 1. ``reports[0]`` is the main report."""

    total: int
    ok: int
    failed: int
    skipped: int
    resumed: int
    seconds: float
    reports: list[Path]
    flagged: int = 0  # ok cases that quality control flagged (their qa_flags column says why)

    @property
    def report(self) -> Path | None:
        """The main report."""
        return self.reports[0] if self.reports else None

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("total", "ok", "flagged", "failed", "skipped", "resumed")}


def shard_path(path: Path, shard: tuple[int, int] | None) -> Path:
    """Where shard K of N of a run into ``path`` goes: ``results.csv`` -> ``results.shard-3-of-8.csv``,
    a folder ``out`` -> ``out.shard-3-of-8``; ``path`` itself without a shard."""
    if shard is None:
        return path
    tag = f".shard-{shard[0]}-of-{shard[1]}"
    return path.with_name(path.stem + tag + path.suffix) if path.suffix else path.with_name(path.name + tag)


def all_shard_paths(path: Path, shard: tuple[int, int] | None) -> list[Path]:
    """Every shard's path of a sharded run (to keep them all out of the inputs), or ``[path]``."""
    return [shard_path(path, (k, shard[1])) for k in range(shard[1])] if shard else [path]


def take_shard(files: Sequence[InputFile], shard: tuple[int, int] | None) -> list[InputFile]:
    """Part K of N of the discovered inputs: every N-th file from the K-th, as nnU-Net splits.

    Discovery sorts the inputs, so every node given the same inputs gets the same parts;
    case ids come from the whole list, so they are those of a single run.
    """
    return list(files) if shard is None else list(files[shard[0] :: shard[1]])


def input_list_record(files: Sequence[InputFile]) -> dict[str, Any]:
    """``{"count", "sha256"}`` of an ordered input list (:func:`mmcli.io.discover.input_list_sha256`).

    ``run.json`` records it for the whole list and, as ``share``, for the part a shard ran:
    ``mmcli merge`` refuses shards of other lists, and shards that lack a case or hold one twice.
    """
    return {"count": len(files), "sha256": input_list_sha256([f.case_id for f in files])}


def new_row(columns: Sequence[str], file: InputFile, **values: Any) -> dict[str, Any]:
    """A row for ``file`` with every one of ``columns`` present (``None`` where unknown)."""
    row: dict[str, Any] = dict.fromkeys(columns)
    row.update(case_id=file.case_id, source=str(file.path), **values)
    return row


def label_for(probability: float, threshold: float, class_names: Sequence[str]) -> str:
    """The last class (pneumonia) from ``threshold`` on, else the first (normal)."""
    return class_names[-1] if probability >= threshold else class_names[0]


def provenance(ckpt: Checkpoint) -> dict[str, Any]:
    """What made a report: version, weights and their sha256, model, preprocessing, classes."""
    return {
        "mmcli_version": __version__,
        "weights": weights_name(ckpt),
        "weights_file": str(ckpt.path),
        "weights_sha256": ckpt.sha256,
        "model": ckpt.model_name,
        "preprocess": ckpt.preprocess.to_dict(),
        "class_names": list(ckpt.class_names),
        "temperature": ckpt.temperature,
    }


@dataclass
class Job:
    """One command's run, as :class:`BatchRun` needs it.

    Attributes:
        name: the command (``predict``, ``explain``), for messages.
        layout: where the files go.
        columns: the report's columns (``case_id``, ``source``, ``status``, ``error`` first).
        task: what one case produces; sent to worker processes, so it must pickle.
        header: the settings a resume must match (recorded as the journal's first line).
        settings: the resolved settings, for ``run.json``.
        still_done: whether a finished row of an earlier run still has its outputs.
        write_reports: writes the reports from the rows in input order; returns their paths.
    """

    name: str
    layout: RunLayout
    columns: tuple[str, ...]
    task: CaseTask
    header: dict[str, Any]
    settings: dict[str, Any]
    still_done: Callable[[Mapping[str, Any]], bool]
    write_reports: Callable[[list[dict[str, Any]]], list[Path]]


def open_inputs(cfg: BatchConfig, exclude: Sequence[Path]) -> tuple[list[InputFile], Predictor]:
    """Discover ``cfg``'s inputs, leaving out ``exclude`` (every shard's outputs), and load the model.

    Raises:
        UsageError: no inputs, or weights that cannot be found, verified or loaded.
    """
    files = discover_inputs(cfg.inputs, exclude=exclude)
    predictor = Predictor(load_weights(cfg.weights), device=cfg.device, precision=cfg.precision)
    if predictor.precision != "fp32" and not has_fast_bf16(predictor.device):
        logger.warning("--precision %s: %s has no native bf16 that mmcli knows of, so bf16 may be emulated there "
                       "and many times slower than --precision fp32", predictor.precision, predictor.device)
    return files, predictor


def resume_header(cfg: BatchConfig, predictor: Predictor, **extra: Any) -> dict[str, Any]:
    """The settings a resume must match: the weights, how the model runs and what a case's
    outputs depend on, plus the command's own (``extra``)."""
    return {
        "weights_sha256": predictor.checkpoint.sha256, "threshold": cfg.threshold, "voi_lut": cfg.voi_lut,
        "precision": predictor.precision, "device_type": predictor.device.type, "max_pixels": cfg.max_pixels,
        "qa": cfg.qa, "raw_masks": cfg.raw_masks, "ood": predictor.ood is not None,
        "shard": list(cfg.shard) if cfg.shard else None, **extra,
    }


def _without_paths(row: dict[str, Any], path: Path) -> dict[str, Any]:
    """The row without its input's path, also where a reason quotes it (``--anonymize-ids``)."""
    error = row.get("error")
    if isinstance(error, str):
        error = error.replace(str(path), row["case_id"])
    return {**row, "source": None, "error": error}


def _settings_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


class BatchRun:
    """A batch run, ready to go: iterate over it to run the cases and get their rows.

    Args:
        job: what the command runs.
        files: the discovered inputs, in report order (all shards: the run takes its own).
        predictor: the loaded model.
        cfg: the run's settings: ``overwrite``, ``fail_fast``, ``batch_size`` and ``workers``
            (``None``: :mod:`mmcli.runtime`'s defaults for the device), ``shard``,
            ``anonymize_ids``, ``verify_inputs``.
        command: the command line, recorded in ``run.json``.

    Raises:
        UsageError: another run holds the folder, or an earlier run there had other settings.
    """

    def __init__(
        self, job: Job, files: Sequence[InputFile], predictor: Predictor, cfg: BatchConfig,
        command: Sequence[str] | None = None,
    ) -> None:
        self.started = time.perf_counter()
        self.job, self.predictor, self.cfg = job, predictor, cfg
        self.command = list(command) if command is not None else None
        device = predictor.device
        self.workers = default_workers(device) if cfg.workers is None else cfg.workers
        in_processes = device.type == "cpu" and self.workers > 0
        self.batch_size = cfg.batch_size or default_batch_size(device, in_processes=in_processes)
        self.engine = iter_rows_processes if in_processes else iter_rows_loader
        probe_writable(job.layout.folder, job.layout.report.parent)
        self._lock = RunLock(job.layout.lock, job.layout.report)
        self._lock.acquire()
        try:
            # the whole list is anonymised (not only this shard's part), so that every shard records
            # the fingerprint of the same ids that the merged report will hold
            files = list(files) if cfg.anonymize_ids is None else anonymize(
                files, cfg.anonymize_ids, outputs=(job.layout.folder, job.layout.report))
            self.files = take_shard(files, cfg.shard)
            self.input_list = {**input_list_record(files), "share": input_list_record(self.files)}
            self._sources = {f.case_id: f.path for f in self.files}
            done = {} if cfg.overwrite else self._still_done()
        except BaseException:
            self._lock.release()
            raise
        self.rows: dict[str, dict[str, Any]] = {f.case_id: done[f.case_id] for f in self.files if f.case_id in done}
        self.todo = [f for f in self.files if f.case_id not in self.rows]
        self.resumed = len(self.rows)
        self.summary: RunSummary | None = None
        logger.info("%d inputs: %d to %s, %d already done", len(self.files), len(self.todo), job.name, self.resumed)

    def _still_done(self) -> dict[str, dict[str, Any]]:
        old_header, rows = Journal(self.job.layout.journal).read()
        if not rows:
            return {}
        if old_header != self.job.header:
            raise UsageError(
                f"{self.job.layout.report} was started with other settings "
                f"({_settings_changes(old_header, self.job.header)}); "
                "pass --overwrite to start again, or choose another --out"
            )
        return {case_id: row for case_id, row in rows.items()
                if row.get("status") == "ok" and case_id in self._sources and self.job.still_done(row)
                and same_input(row.get(FINGERPRINT), fingerprint(self._sources[case_id], self.cfg.verify_inputs))}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Run the cases still to do, yielding each row as it finishes; then write the reports."""
        journal = Journal(self.job.layout.journal)
        try:
            yield from self._run(journal)
        except OSError as err:  # disk full, folder removed, read-only remount... mid-run
            raise MMCLIError(
                f"cannot write {err.filename or self.job.layout.folder}: {err.strerror or err}; the cases "
                f"finished so far are kept in {self.job.layout.journal}: fix this and run the same command again"
            ) from err
        finally:
            self._lock.release()

    def _run(self, journal: Journal) -> Iterator[dict[str, Any]]:
        journal.start(self.job.header, self.rows.values())
        logger.info("%s with %d worker(s), batch %d", self.engine.__name__, self.workers, self.batch_size)
        results = self.engine(self.predictor, self.todo, self.job.task, batch_size=self.batch_size,
                              workers=self.workers, case_timeout=self.cfg.case_timeout)
        try:
            for row in results:
                if self.cfg.anonymize_ids is not None:
                    row = _without_paths(row, self._sources[row["case_id"]])
                self.rows[row["case_id"]] = row
                journal.append({**row, FINGERPRINT: fingerprint(self._sources[row["case_id"]], self.cfg.verify_inputs)})
                yield row
                if self.cfg.fail_fast and row["status"] == "error":
                    break
        finally:
            results.close()
            journal.close()
        self._finish()

    def run(self, on_case: Callable[[dict[str, Any]], None] | None = None) -> RunSummary:
        """Run to the end, calling ``on_case`` (if given) with each finished row."""
        for row in self:
            if on_case is not None:
                on_case(row)
        assert self.summary is not None
        return self.summary

    def _finish(self) -> None:
        ordered = [self.rows.get(f.case_id) or new_row(self.job.columns, f, status="skipped", error=SKIPPED_REASON)
                   for f in self.files]
        reports = self.job.write_reports(ordered)
        statuses = Counter(r["status"] for r in ordered)
        flagged = sum(r["status"] == "ok" and bool(r.get("qa_flags")) for r in ordered)
        summary = RunSummary(len(self.files), statuses["ok"], statuses["error"], statuses["skipped"], self.resumed,
                             time.perf_counter() - self.started, reports, flagged)
        command, settings = self.command, dict(self.job.settings)
        if self.cfg.anonymize_ids is not None:  # names given on the command line may be patients' names
            command, settings["inputs"] = None, f"{len(settings['inputs'])} input(s): see the --anonymize-ids file"
        write_json(self.job.layout.manifest, {
            "command": command,
            "settings": {**settings, "batch_size": self.batch_size, "workers": self.workers,
                         "engine": self.engine.__name__},
            "provenance": provenance(self.predictor.checkpoint),
            "device": str(self.predictor.device),
            "precision": self.predictor.precision,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "platform": sys.platform},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "input_list": self.input_list,
            "counts": summary.counts(),
            "seconds": round(summary.seconds, 3),
            "outputs": {"folder": str(self.job.layout.folder), "reports": [str(p) for p in summary.reports]},
        })
        self.summary = summary
