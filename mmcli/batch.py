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
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcli import __version__
from mmcli.config import BatchConfig
from mmcli.engines import CaseTask, iter_rows_loader, iter_rows_processes
from mmcli.errors import MMCLIError, UsageError
from mmcli.inference import Predictor
from mmcli.io import ownership
from mmcli.io.discover import InputFile, discover_inputs, input_list_sha256
from mmcli.io.identity import FINGERPRINT, anonymize, fingerprint, same_input
from mmcli.io.runfolder import REPORT_FORMATS, Journal, RunLayout, open_run_folder, run_record, write_run_json
from mmcli.runtime import default_batch_size, default_workers, has_fast_bf16
from mmcli.status import Status
from mmcli.weights import Checkpoint, load_weights, weights_name

logger = logging.getLogger(__name__)

SKIPPED_REASON = "not processed: the run stopped at the first failure (--fail-fast)"
RELABEL_KEYS = frozenset({"threshold"})  # resume settings a rerun applies to the stored rows (Job.relabel)


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
        file_columns: the report columns that name a case's files (relative to the report's
            folder): what a rerun may remove of an earlier run (:mod:`mmcli.io.ownership`).
        extra_reports: reports written besides ``layout.report`` (``--hdf5``).
        relabel: a finished row under new :data:`RELABEL_KEYS` settings, from its stored values
            (no model call); None: such a rerun is refused like any other change of settings.
    """

    name: str
    layout: RunLayout
    columns: tuple[str, ...]
    task: CaseTask
    header: dict[str, Any]
    settings: dict[str, Any]
    still_done: Callable[[Mapping[str, Any]], bool]
    write_reports: Callable[[list[dict[str, Any]]], list[Path]]
    file_columns: tuple[str, ...] = ()
    extra_reports: tuple[Path, ...] = ()
    relabel: Callable[[dict[str, Any], InputFile], dict[str, Any]] | None = None


def check_outputs_apart(cfg: BatchConfig, outputs: Sequence[Path]) -> None:
    """Refuse outputs on the inputs: a run folder or report that is an input, or holds one.

    ``--out scans.csv`` puts its run folder ``scans/`` on an input folder ``scans/``: the
    masks and ``run.json`` would land among the radiographs (and the folder would be taken
    for a run's, never searched again), so the run is refused before anything is written.

    Raises:
        UsageError: naming the output, the input and what to do.
    """
    for text in cfg.inputs:
        root = _input_root(str(text))
        for out in outputs:
            kind = "report" if out.suffix.lower() in REPORT_FORMATS else "run folder"
            if out == root:
                what = "the input folder" if root.is_dir() else "the input"
                raise UsageError(f"--out {cfg.out} would put its {kind} {out} on {what} {text}; choose another name")
            if out in root.parents:
                raise UsageError(f"--out {cfg.out} would put its {kind} {out} around the input {text}; "
                                 "choose another name")


def _input_root(text: str) -> Path:
    """The file or folder an input names: for a glob, its leading parts without wildcards."""
    parts = Path(text).expanduser().parts
    fixed = parts[: next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))]
    return Path(*fixed).resolve() if fixed else Path.cwd()


def open_inputs(cfg: BatchConfig, exclude: Sequence[Path]) -> tuple[list[InputFile], Predictor]:
    """Discover ``cfg``'s inputs, leaving out ``exclude`` (every shard's outputs), and load the model.

    Raises:
        UsageError: outputs on the inputs (:func:`check_outputs_apart`), no inputs, or weights
            that cannot be found, verified or loaded.
    """
    check_outputs_apart(cfg, [Path(p).expanduser().resolve() for p in exclude])
    files = discover_inputs(cfg.inputs, exclude=exclude)
    predictor = Predictor(load_weights(cfg.weights), device=cfg.device, precision=cfg.precision)
    if predictor.precision != "fp32" and not has_fast_bf16(predictor.device):
        logger.warning("--precision %s: %s has no native bf16 that mmcli knows of, so bf16 may be emulated there "
                       "and many times slower than --precision fp32", predictor.precision, predictor.device)
    return files, predictor


def open_batch(cfg: BatchConfig, layout_of: Callable[[Path], RunLayout],
               make_job: Callable[[RunLayout, Predictor], Job], command: Sequence[str] | None) -> BatchRun:
    """The opening every batch command shares: its layout (of its shard, if sharded), the inputs
    discovered without any shard's outputs, the model, then the command's job and the run.

    Args:
        layout_of: the layout of a run into ``--out`` (:meth:`RunLayout.for_report` or a folder's).
        make_job: the command's :class:`Job`, given the layout and the loaded model.
    """
    layout = layout_of(shard_path(cfg.out, cfg.shard))
    every = [layout_of(path) for path in all_shard_paths(cfg.out.expanduser().resolve(), cfg.shard)]
    files, predictor = open_inputs(cfg, exclude=list(dict.fromkeys(p for o in every for p in (o.report, o.folder))))
    return BatchRun(make_job(layout, predictor), files, predictor, cfg, command)


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
        layout = job.layout
        self._lock = open_run_folder(layout, job.name, columns=job.columns, extra_reports=job.extra_reports)
        try:
            # the whole list is anonymised (not only this shard's part), so that every shard records
            # the fingerprint of the same ids that the merged report will hold
            files = list(files) if cfg.anonymize_ids is None else anonymize(
                files, cfg.anonymize_ids, outputs=(job.layout.folder, job.layout.report))
            self.files = take_shard(files, cfg.shard)
            self.input_list = {**input_list_record(files), "share": input_list_record(self.files)}
            self._sources = {f.case_id: f.path for f in self.files}
            self.relabel: str | None = None  # the settings changes applied to the resumed rows
            old_header, old_rows = Journal(layout.journal).read()
            done = {} if cfg.overwrite else self._still_done(old_header, old_rows)
            self._stale = self._earlier_outputs(old_rows, done)
        except BaseException:
            self._lock.release()
            raise
        self.rows: dict[str, dict[str, Any]] = {f.case_id: done[f.case_id] for f in self.files if f.case_id in done}
        self.todo = [f for f in self.files if f.case_id not in self.rows]
        self.resumed = len(self.rows)
        self.summary: RunSummary | None = None
        logger.info("%d inputs: %d to %s, %d already done", len(self.files), len(self.todo), job.name, self.resumed)

    def _still_done(self, old_header: dict[str, Any], rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not rows:
            return {}
        changed = {k for k in {*old_header, *self.job.header} if old_header.get(k) != self.job.header.get(k)}
        if changed and (self.job.relabel is None or not changed <= RELABEL_KEYS):
            raise UsageError(
                f"{self.job.layout.report} was started with other settings "
                f"({_settings_changes(old_header, self.job.header)}); "
                "pass --overwrite to start again, or choose another --out"
            )
        self.relabel = _settings_changes(old_header, self.job.header) or None
        return {case_id: row for case_id, row in rows.items()
                if row.get("status") == Status.OK and case_id in self._sources and self.job.still_done(row)
                and same_input(row.get(FINGERPRINT), fingerprint(self._sources[case_id], self.cfg.verify_inputs))}

    def _earlier_outputs(self, rows: dict[str, dict[str, Any]], done: Mapping[str, Mapping[str, Any]]) -> list[Path]:
        """What the earlier run into this place recorded as its own (its journal's and its report's
        rows, its other reports) and this run will not write again: removed when the run starts."""
        job, layout = self.job, self.job.layout
        earlier = [*rows.values(), *ownership.report_rows(layout.report, job.file_columns)]
        keep = [row for case_id, row in done.items() if case_id in self._sources]
        base = layout.report.parent
        stale = (ownership.recorded_files(earlier, job.file_columns, base, layout.folder)
                 - ownership.recorded_files(keep, job.file_columns, base, layout.folder))
        manifest = ownership.read_manifest(layout.folder) or {}
        reports = {Path(str(r)) for r in (manifest.get("outputs") or {}).get("reports", [])}
        own = lambda r: ownership.report_is_own(r, layout.folder, job.name, job.columns)  # noqa: E731
        gone = [r for r in reports - {layout.report, *job.extra_reports}  # an earlier --hdf5, say
                if r.suffix.lower() in REPORT_FORMATS and r.is_file()
                and not ownership.inside(r, layout.folder) and own(r)]
        return sorted(stale) + gone

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
        layout = self.job.layout
        removed = ownership.remove_files([p for p in self._stale if ownership.inside(p, layout.folder)], layout.folder)
        for report in (p for p in self._stale if not ownership.inside(p, layout.folder)):
            report.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.info("removed %d file(s) of the earlier run that this run does not write", removed)
        if self.relabel is not None and self.job.relabel is not None:
            logger.info("relabelling %d finished case(s) from their stored values (%s)", len(self.rows), self.relabel)
            files = {f.case_id: f for f in self.files}
            self.rows = {case_id: self.job.relabel(row, files[case_id]) for case_id, row in self.rows.items()}
        journal.start(self.job.header, self.rows.values(), command=self.job.name)
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
                if self.cfg.fail_fast and row["status"] == Status.ERROR:
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
        ordered = [self.rows.get(f.case_id) or new_row(self.job.columns, f, status=Status.SKIPPED, error=SKIPPED_REASON)
                   for f in self.files]
        reports = self.job.write_reports(ordered)
        statuses = Counter(r["status"] for r in ordered)
        flagged = sum(r["status"] == Status.OK and bool(r.get("qa_flags")) for r in ordered)
        summary = RunSummary(len(self.files), statuses[Status.OK], statuses[Status.ERROR], statuses[Status.SKIPPED],
                             self.resumed, time.perf_counter() - self.started, reports, flagged)
        command, settings = self.command, dict(self.job.settings)
        if self.cfg.anonymize_ids is not None:  # names given on the command line may be patients' names
            command, settings["inputs"] = None, f"{len(settings['inputs'])} input(s): see the --anonymize-ids file"
        write_run_json(self.job.layout, run_record(
            self.job.name, argv=command, status="finished", seconds=summary.seconds, counts=summary.counts(),
            settings={**settings, "batch_size": self.batch_size, "workers": self.workers,
                      "engine": self.engine.__name__},
            outputs={"folder": str(self.job.layout.folder), "reports": [str(p) for p in summary.reports]},
            provenance=provenance(self.predictor.checkpoint), device=str(self.predictor.device),
            precision=self.predictor.precision, input_list=self.input_list,
        ))
        self.summary = summary
