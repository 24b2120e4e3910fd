"""``mmcli predict`` as a library call: a batch of radiographs in, masks and reports out.

Outputs for ``--out results.csv`` (or ``results.h5``)::

    results.csv               one row per input (REPORT_COLUMNS)
    results/masks/<case>.png  lung mask at the input's native resolution, 1-bit PNG
    results/run.json          the command, resolved settings, versions, device, counts
    results/journal.jsonl     finished cases, read back to resume a killed run

Each case fails alone: a file that cannot be read gets status ``error`` and its reason,
the rest of the batch goes on.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcli import __version__
from mmcli.errors import UsageError
from mmcli.inference import Precision, Predictor
from mmcli.io.discover import discover_inputs
from mmcli.io.writers import Journal, read_mask_png, write_csv, write_hdf5, write_json
from mmcli.pipeline import (
    REPORT_COLUMNS,
    RowSettings,
    iter_rows_loader,
    iter_rows_processes,
    new_row,
    record_rows,
)
from mmcli.weights import load_weights

logger = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5")
REPORT_SUFFIXES = (".csv", *HDF5_SUFFIXES)


@dataclass(frozen=True)
class PredictConfig:
    """Resolved settings of one ``predict`` run (written to ``run.json``)."""

    inputs: tuple[str, ...]
    out: Path
    weights: str | None = None
    device: str = "auto"
    precision: Precision = "auto"
    batch_size: int | None = None
    workers: int | None = None
    threshold: float = 0.5
    voi_lut: bool = False
    overwrite: bool = False
    fail_fast: bool = False
    hdf5: Path | None = None

    def __post_init__(self) -> None:
        if self.out.suffix.lower() not in REPORT_SUFFIXES:
            raise UsageError(f"--out must end in .csv, .h5 or .hdf5, got {self.out.name!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be 0 or more, got {self.workers}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold must lie in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class OutputLayout:
    """Where a run's files go, all derived from the report path."""

    report: Path
    folder: Path
    masks: Path
    manifest: Path
    journal: Path

    @classmethod
    def for_report(cls, report: Path) -> OutputLayout:
        folder = report.with_suffix("")
        return cls(report, folder, folder / "masks", folder / "run.json", folder / "journal.jsonl")


@dataclass
class PredictSummary:
    """Counts of a finished run; ``failed > 0`` means exit code 1."""

    total: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    resumed: int = 0
    seconds: float = 0.0
    report: Path | None = None
    extra_reports: list[Path] = field(default_factory=list)


def default_workers(device: torch.device) -> int:
    """One worker process per usable core on a CPU; up to 8 decoders beside a GPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if device.type == "cpu" else min(8, cores)


def _settings_header(cfg: PredictConfig, sha256: str | None) -> dict[str, Any]:
    return {"weights_sha256": sha256, "threshold": cfg.threshold, "voi_lut": cfg.voi_lut}


def _previous_rows(layout: OutputLayout, header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Finished cases of an earlier run into the same report, to resume from."""
    old_header, rows = Journal(layout.journal).read()
    if not rows:
        return {}
    if old_header != header:
        raise UsageError(
            f"{layout.report} was started with other settings ({old_header}); "
            "pass --overwrite to start again, or choose another --out"
        )
    finished = {}
    for case_id, row in rows.items():
        mask = row.get("mask")
        if row.get("status") == "ok" and (mask is None or (layout.report.parent / mask).is_file()):
            finished[case_id] = row
    return finished


def _write_reports(
    cfg: PredictConfig, layout: OutputLayout, rows: list[dict[str, Any]], provenance: dict[str, Any]
) -> list[Path]:
    written = []
    targets = [layout.report] + ([cfg.hdf5] if cfg.hdf5 is not None else [])
    for target in targets:
        if target.suffix.lower() in HDF5_SUFFIXES:

            def load_mask(row: dict[str, Any]) -> np.ndarray | None:
                mask = row.get("mask")
                return read_mask_png(layout.report.parent / mask) if mask else None

            write_hdf5(target, rows, REPORT_COLUMNS, masks=load_mask, attrs=provenance)
        else:
            write_csv(target, rows, REPORT_COLUMNS)
        written.append(target)
    return written


def run_predict(
    cfg: PredictConfig,
    *,
    on_start: Callable[[int, int], None] | None = None,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    command: Sequence[str] | None = None,
) -> PredictSummary:
    """Predict every input of ``cfg`` and write the reports.

    Args:
        on_start: called once with (cases to run, cases resumed from an earlier run).
        on_case: called with each finished row (status ok or error), for progress display.
        command: the command line, recorded in ``run.json``.
    """
    started = time.perf_counter()
    layout = OutputLayout.for_report(cfg.out.expanduser().resolve())
    files = discover_inputs(cfg.inputs, exclude=[layout.folder, layout.report])
    ckpt = load_weights(cfg.weights)
    predictor = Predictor(ckpt, device=cfg.device, precision=cfg.precision)
    header = _settings_header(cfg, ckpt.sha256)
    previous = {} if cfg.overwrite else _previous_rows(layout, header)
    done = {f.case_id: previous[f.case_id] for f in files if f.case_id in previous}
    todo = [f for f in files if f.case_id not in done]
    logger.info("%d inputs: %d to predict, %d already done", len(files), len(todo), len(done))
    if on_start is not None:
        on_start(len(todo), len(done))

    journal = Journal(layout.journal)
    journal.start(header, done.values())
    rows: dict[str, dict[str, Any]] = dict(done)
    summary = PredictSummary(total=len(files), resumed=len(done))
    rs = RowSettings(cfg.threshold, layout.masks, layout.report.parent, tuple(ckpt.class_names), cfg.voi_lut)
    workers = default_workers(predictor.device) if cfg.workers is None else cfg.workers
    in_processes = predictor.device.type == "cpu" and workers > 0
    # A CPU worker runs small batches on one thread (2 measured best); a GPU wants big ones.
    batch_size = cfg.batch_size or (2 if in_processes else 4 if predictor.device.type == "cpu" else 16)
    engine = iter_rows_processes if in_processes else iter_rows_loader
    logger.info("%s with %d worker(s), batch %d", engine.__name__, workers, batch_size)
    results = engine(predictor, todo, rs, batch_size=batch_size, workers=workers)
    record_rows(results, journal, rows, on_case=on_case, fail_fast=cfg.fail_fast)

    for f in files:
        if f.case_id not in rows:
            rows[f.case_id] = new_row(
                f, status="skipped", error="not processed: the run stopped at the first failure (--fail-fast)"
            )
    ordered = [rows[f.case_id] for f in files]
    summary.ok = sum(r["status"] == "ok" for r in ordered)
    summary.failed = sum(r["status"] == "error" for r in ordered)
    summary.skipped = sum(r["status"] == "skipped" for r in ordered)
    summary.seconds = time.perf_counter() - started

    provenance = {
        "mmcli_version": __version__,
        "weights": str(ckpt.path),
        "weights_sha256": ckpt.sha256,
        "model": ckpt.model_name,
        "preprocess": ckpt.preprocess.to_dict(),
        "class_names": list(ckpt.class_names),
        "temperature": ckpt.temperature,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    written = _write_reports(cfg, layout, ordered, provenance)
    summary.report, summary.extra_reports = written[0], written[1:]
    write_json(layout.manifest, {
        "command": list(command) if command is not None else None,
        "settings": {
            **asdict(cfg),  # write_json turns paths into strings
            "batch_size": batch_size, "workers": workers, "engine": engine.__name__,
        },
        "provenance": provenance,
        "device": str(predictor.device),
        "precision": predictor.precision,
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "platform": sys.platform,
        },
        "counts": {k: getattr(summary, k) for k in ("total", "ok", "failed", "skipped", "resumed")},
        "seconds": round(summary.seconds, 3),
        "outputs": {"reports": [str(p) for p in written], "masks": str(layout.masks)},
    })
    return summary
